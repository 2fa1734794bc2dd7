"""Built-in text sources for calibration and evaluation."""
