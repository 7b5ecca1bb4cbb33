"""A tiny CNN registered in timm's registry for fast end-to-end tests (about 25k parameters)."""
import torch.nn as nn
from timm.models import register_model
from timm.models._registry import is_model


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_):
        super().__init__()
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
                               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(in_chans, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2),
                                      block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(64, num_classes)

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))


if not is_model("tiny_cnn_test"):
    @register_model
    def tiny_cnn_test(pretrained: bool = False, **kwargs) -> TinyCNN:
        kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "drop_rate")}
        return TinyCNN(**kwargs)
