"""Training the model: the CXR data set (dataset), the network (model), metrics, read-outs (readouts,
readout_fits, readout_figures), and the CLIs train, train_sequence_risk, export_onnx, evaluate, model_card,
drift_reference, with their parts beside them (targets, feature_cache, train_*, sequence_risk_*,
evaluate_*). Needs the `tools` extra."""
