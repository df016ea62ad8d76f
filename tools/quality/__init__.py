"""Performance and robustness runs against the real daemon: bench, soak, fuzz, hostile_bench, and
gen_cart_dicoms (cart-sized DICOMs for them). They use the `testsupport` package (broker, daemon, mutator).
bench and soak have their parts beside them (bench_*, soak_*)."""
