"""Sound bounds through the ONNX graph: intervals, linear relaxations, slopes, global Lipschitz."""
