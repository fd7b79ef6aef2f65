"""The compiler core: everything between a model file and a written checkpoint, except the methods.

    ir/           the graph IR both front-ends import into
    frontends/    loaders (file -> Model) and importers (Model -> IR: torch.export, ONNX)
    analysis/     coupled-dimension analysis (groups of channels that shrink together), the LLM recogniser
    surgery/      the one mechanism that removes or zeroes a plan's channels (PyTorch and ONNX)
    calibration/  calibration sources, the layer-by-layer driver, statistics, perplexity
    pipeline/     Pass / PassManager / registry, recipes, instruments
    emit/         writers (HF, ONNX, .pt2), verification on reload, the report, atomic output
    model.py      `Model`, what flows through a pipeline;  groups.py  `Group`, `Slice`, `Role`
"""
