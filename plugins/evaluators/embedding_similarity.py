"""`embedding-similarity`: for encoders — cosine similarity between the baseline's and the quantized model's
mean-pooled embeddings of the same evaluation windows (1.0 = identical directions)."""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfquant import hookimpl


def mean_pooled(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.float().mean(dim=1)


class EmbeddingSimilarity:
    options = ("batch_size",)

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, model, windows, reference=None, label="model"):
        device = next(model.parameters()).device
        embs = []
        for start in tqdm(range(0, len(windows), self.batch_size), desc=f"embed {label}", leave=False):
            embs.append(mean_pooled(model, windows.input_ids[start : start + self.batch_size].to(device)).cpu())
        emb = torch.cat(embs)
        if reference is None:
            return {"embeddings": int(emb.shape[0]), "_embeddings": emb}
        cos = F.cosine_similarity(emb, reference["_embeddings"], dim=-1)
        return {"embeddings": int(emb.shape[0]), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    def protocol(self) -> dict:
        return {"embedding": "mean over tokens of the last hidden state; cosine per window, mean and min"}


@hookimpl
def register_evaluators(register):
    register("embedding-similarity", EmbeddingSimilarity)
