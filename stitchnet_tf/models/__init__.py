"""Networks: the MobileNetV2 backbone, the SVAE ladder, StitchNet and the baselines."""
