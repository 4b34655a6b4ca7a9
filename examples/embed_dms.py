import torch, torch.nn as nn, torch.nn.functional as F
from fusionkit import DMSFusion

class MyModel(nn.Module):
    def __init__(self, dim=128, classes=10):
        super().__init__()
        self.image, self.text = nn.Linear(512, dim), nn.Linear(384, dim)  # your encoders here
        self.fusion = DMSFusion(["image", "text"], dim=dim, num_classes=classes)
        self.head = nn.Linear(dim, classes)
    def forward(self, image, text, mask=None):  # mask: (B, 2) bool, False = missing
        out = self.fusion({"image": self.image(image), "text": self.text(text)}, mask)
        return self.head(out.fused), out

model, y = MyModel(), torch.randint(0, 10, (8,))
logits, out = model(torch.randn(8, 512), torch.randn(8, 384))
(F.cross_entropy(logits, y) + model.fusion.loss(out, y)).backward()  # + aux heads + MWCL
print(out.weights)  # (8, 2): per-sample weights, rows sum to 1
