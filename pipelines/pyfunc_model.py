"""The registered model, logged as code (MLflow "models from code"): loading it runs this file and reads
the weights with torch.load(weights_only=True), so no pickled object from an artifact is ever executed.

Input: float32 RGB batch (N, 3, H, W) in [0, 1], any H, W. Output: float32 logits (N, classes, H, W).
"""

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F


class SegNetModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from data_prep.augment import MEAN, STD
        from segnet import build_model
        from segnet.errors import SegNetError
        from segnet.layers import fold_batch_norm

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        weights = Path(context.artifacts["weights"])
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != meta["weights_sha256"]:
            raise SegNetError(
                f"{weights} has sha256 {digest}, but the model was logged with {meta['weights_sha256']}: "
                "the weights file was changed after logging; refusing to load it"
            )
        options = {"dropout": meta["config"]["dropout"]} if meta["config"].get("dropout") else {}
        model = build_model(meta["config"]["model"], num_classes=meta["num_classes"], **options)
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable weights get one clear message
            raise SegNetError(f"{weights} could not be loaded as weights: {e}") from e
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = fold_batch_norm(model).to(self.device, memory_format=torch.channels_last)
        self.size = tuple(meta["image_size"])
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        size = x.shape[-2:]
        x = (x - self.mean) / self.std
        if tuple(size) != self.size:  # the model sees the size it was trained at
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        logits = self.model(x.contiguous(memory_format=torch.channels_last))
        if tuple(size) != self.size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.float().cpu().numpy()


mlflow.models.set_model(SegNetModel())
