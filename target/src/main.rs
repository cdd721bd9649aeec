//! The rvhost target binary.

fn main() {}
