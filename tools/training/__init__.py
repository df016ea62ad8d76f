"""Training the model: the CXR data set (dataset), the network (model), metrics, read-outs, and the CLIs
train, train_sequence_risk, export_onnx, evaluate, model_card, drift_reference. Needs the `tools` extra."""
