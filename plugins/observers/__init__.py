"""Built-in observers, one plugin module each."""
