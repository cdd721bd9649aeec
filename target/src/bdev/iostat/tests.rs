use super::*;

/// `spdk_histogram_data_tally` for the default geometry, written out as SPDK's C does it, as
/// a reference.
#[allow(clippy::implicit_saturating_sub)]
fn spdk_bucket(datapoint: u64) -> usize {
    let granularity = 7u32;
    let lsb = 64 - granularity;
    let clz = if datapoint > 0 {
        datapoint.leading_zeros()
    } else {
        64
    };
    let range = if clz <= lsb { lsb - clz } else { 0 };
    let shift = if range == 0 { 0 } else { range - 1 };
    let index = (datapoint >> shift) & ((1 << granularity) - 1);
    ((range as usize) << granularity) + index as usize
}

/// `spdk_histogram_data_tally` with any geometry, written out as SPDK's C does it.
#[allow(clippy::implicit_saturating_sub)]
fn spdk_tally(granularity: u32, min_range: u32, max_range: u32, datapoint: u64) -> usize {
    let lsb = 64 - granularity;
    let clz = if datapoint > 0 {
        datapoint.leading_zeros()
    } else {
        64
    };
    let mut range = if clz <= lsb { lsb - clz } else { 0 };
    let index;
    if range < min_range {
        range = min_range;
        index = 0;
    } else if range > max_range {
        range = max_range;
        index = (1u64 << granularity) - 1;
    } else {
        let shift = if range == 0 { 0 } else { range - 1 };
        index = (datapoint >> shift) & ((1 << granularity) - 1);
    }
    (((range - min_range) as usize) << granularity) + index as usize
}

#[test]
#[allow(clippy::implicit_saturating_sub)]
fn other_geometries_are_spdks_and_rebin_exactly() {
    let mut points: Vec<u64> = vec![0, 1, 2, 3, 127, 128, 129, 1000, 2395, 2_400_000];
    points.extend((0..64).map(|s| 1u64 << s));
    points.extend((1..64).map(|s| (1u64 << s) - 1));
    points.extend((1..64).map(|s| (1u64 << s) + 12345 % (1u64 << s)));
    for granularity in 1..=7 {
        for (min, max) in [
            (0, u64::MAX),
            (2400, 288_000_000_000),
            (1, 2),
            (100, 1 << 20),
        ] {
            let geometry = HistogramGeometry::new(granularity, min, max).unwrap();
            let lsb = 64 - granularity;
            let spdk_range = |v: u64| {
                let clz = if v > 0 { v.leading_zeros() } else { 64 };
                if clz <= lsb {
                    lsb - clz
                } else {
                    0
                }
            };
            assert_eq!(geometry.min_range, spdk_range(min));
            assert_eq!(geometry.max_range, spdk_range(max - 1));
            let mut default_counts = vec![0u64; HISTOGRAM_BUCKETS];
            let mut expected = vec![0u64; geometry.buckets()];
            for &p in &points {
                let bucket = spdk_tally(granularity, geometry.min_range, geometry.max_range, p);
                assert_eq!(
                    geometry.bucket(p),
                    bucket,
                    "g{granularity} {min}..{max}: {p}"
                );
                expected[bucket] += 1;
                default_counts[histogram_bucket(p)] += 1;
            }
            assert_eq!(
                geometry.rebin(&default_counts),
                expected,
                "g{granularity} {min}..{max}"
            );
        }
    }
    assert_eq!(
        HistogramGeometry::new(7, 0, u64::MAX),
        Some(HistogramGeometry::default())
    );
    assert!(HistogramGeometry::new(8, 0, 10).is_none());
    assert!(HistogramGeometry::new(0, 0, 10).is_none());
    assert!(HistogramGeometry::new(5, 10, 10).is_none());
}

#[test]
fn histogram_buckets_are_spdks() {
    let mut points = vec![
        0,
        1,
        2,
        127,
        128,
        129,
        255,
        256,
        1000,
        u64::MAX,
        u64::MAX - 1,
    ];
    points.extend((0..64).map(|s| 1u64 << s));
    points.extend((1..64).map(|s| (1u64 << s) - 1));
    for p in points {
        assert_eq!(histogram_bucket(p), spdk_bucket(p), "{p}");
        assert!(histogram_bucket(p) < HISTOGRAM_BUCKETS, "{p}");
    }
}
