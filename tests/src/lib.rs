//! Integration and property tests for rvhost, including real QEMU guests.
