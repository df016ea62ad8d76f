"""Getting the appliance onto a machine: bundle (the offline install archive for carts, installed by
tools/install.sh --offline) and demo (a local broker + daemon on the bundled model, run by tools/run.sh)."""
