//! Random I/O on several queues of two controllers (on two reactors when the machine has two
//! cores), checked against a model of the disk, while the frontend keeps adding and removing an
//! unrelated memory region: memory-table swaps under load must not lose or corrupt requests.

mod vhost_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostUserMemoryRegionInfo;
use vhost_support::*;

/// xorshift64*, so the test needs no RNG crate and every run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const SECTORS: u64 = 512;
const FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_BLK_F_MQ | VIRTIO_BLK_F_WRITE_ZEROES;

fn worker(mut d: Driver, seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    for i in 0..ops {
        let q = i % d.queues.len();
        let sectors = 1 + rng.next() % 8;
        let sector = rng.next() % (SECTORS - sectors + 1);
        let (start, len) = ((sector * 512) as usize, (sectors * 512) as usize);
        match rng.next() % 4 {
            0 | 1 => {
                let data = pattern((rng.next() & 0xff) as u8, len);
                assert_eq!(d.write_blocks(q, sector, &data), S_OK, "write #{i}");
                model[start..start + len].copy_from_slice(&data);
            }
            2 => {
                let (status, back) = d.read_blocks(q, sector, len);
                assert_eq!(status, S_OK, "read #{i}");
                assert!(
                    back == model[start..start + len],
                    "read #{i} at sector {sector} differs from the model"
                );
            }
            _ => {
                let mut range = [0u8; 16];
                range[0..8].copy_from_slice(&sector.to_le_bytes());
                range[8..12].copy_from_slice(&(sectors as u32).to_le_bytes());
                assert_eq!(
                    d.request(q, T_WRITE_ZEROES, 0, Some((&range, false))).0,
                    S_OK,
                    "write-zeroes #{i}"
                );
                model[start..start + len].fill(0);
            }
        }
    }
}

#[test]
fn vhost_stress_random_io_with_memory_churn() {
    // Up to two reactors: the controllers land on different cores when there are two.
    let mask = online_mask() & 0x3;
    let (dp, dir) = start_on(
        mask,
        "stress",
        &[
            ("s0", malloc_bdev("S0", SECTORS, 512), false),
            ("s1", malloc_bdev("S1", SECTORS, 512), false),
        ],
    );
    let mut drivers = Vec::new();
    for name in ["s0", "s1"] {
        let mut d = Driver::ready(&dir.join(name), FEATURES);
        for q in 1..4 {
            d.setup_queue(q);
        }
        drivers.push(d);
    }
    let churn_frontend = drivers[0].frontend.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut frontend = churn_frontend;
            let extra = GuestRam::new(1 << 20);
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: 1 << 33,
                memory_size: 1 << 20,
                userspace_addr: FRONTEND_VA + (1 << 37),
                mmap_offset: 0,
                mmap_handle: std::os::unix::io::AsRawFd::as_raw_fd(&extra.file),
            };
            let mut swaps = 0u32;
            while !stop.load(Ordering::Relaxed) {
                frontend
                    .add_mem_region(&region)
                    .expect("ADD_MEM_REG under load");
                frontend
                    .remove_mem_region(&region)
                    .expect("REM_MEM_REG under load");
                swaps += 2;
            }
            swaps
        })
    };
    let workers: Vec<_> = drivers
        .into_iter()
        .enumerate()
        .map(|(i, d)| std::thread::spawn(move || worker(d, 0x9e37_79b9_7f4a_7c15 ^ i as u64, 1500)))
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = churn.join().expect("churn");
    assert!(
        swaps >= 2,
        "the memory table was swapped under load ({swaps} times)"
    );
    eprintln!("memory table swapped {swaps} times during the run");
    dp.shutdown();
}
