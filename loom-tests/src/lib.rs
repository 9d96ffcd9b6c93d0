//! Loom models of `tai-loadbalancer` live in `tests/`; this library is empty on purpose.
//! See `README.md` for what each model proves and how to run them.
