"""Pieces several methods share: pretrained feature pyramids, the letterbox mask and image-score
rules, and the anomaly-model base class every method's ``nn.Module`` derives from."""
