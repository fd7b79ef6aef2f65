"""The graph IR: one operator-level graph that both front-ends (torch.export, ONNX) import into."""
