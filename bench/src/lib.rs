//! Microbenchmarks and the rvhost-perf vhost-user load generator.
