//! Declares the `loom` cfg (set by RUSTFLAGS when model-checking the SPSC ring) so rustc knows it.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
