"""Developer and operator tools around the appliance; never imported by the runtime package `appliance`.

- tools.training: the CXR data set, the cxr-lite0 network, training, ONNX export, evaluation, model card,
  drift reference (needs the `tools` extra: torch, scikit-learn, ...);
- tools.engines: quantisation and its parity gate, TensorRT engine builds and parity checks, Triton
  export, latency;
- tools.quality: benchmark, soak, reader fuzz, hostile-input bench, cart-sized DICOM generator (they use
  the `testsupport` package: a real Mosquitto, the daemon as a child process, the file mutator);
- tools.deploy: the offline install bundle and the local demo.

Each CLI is a module with `main()`: `python -m tools.<group>.<name>` or its console script (`cxr-train`,
`cxr-quantize`, ...; pyproject.toml lists them). The shell scripts (setup.sh, test.sh, run.sh,
install.sh, lock.sh) stay beside this file.
"""
