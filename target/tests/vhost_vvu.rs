//! A vhost-user-blk controller served through the virtio-vhost-user transport, end to end in one
//! process: a vhost-user frontend (the `vhost` crate's, with the test driver's rings in its
//! shared guest memory) connects to the emulated virtio-vhost-user device's socket; rvhost drives
//! the device with its virtio-vhost-user driver, answers the tunnelled messages with its usual
//! session, maps the frontend's memory from the device's shared memory window, takes kicks as the
//! device's notification interrupts and signals completions through doorbells. Blocks written
//! through it land in the malloc bdev and read back; the config space is the controller's; a
//! second frontend is served after the first disconnects.

mod vhost_support;

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rvhost_platform_linux::NumaTopology;
use rvhost_target::blk::BlkController;
use rvhost_target::reactor::{self, IdlePolicy};
use rvhost_target::vhost::{DeviceBackend, VhostServer};
use rvhost_vvu::VvuDevice;
use rvhost_vvu_emu::{EmuConfig, EmuDevice};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vhost_support::{
    malloc_bdev, pattern, Driver, GuestRam, MEM_SIZE, S_OK, TIMEOUT,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};

/// Connects to the device's socket and negotiates what the device forwards.
fn connect(socket: &std::path::Path) -> Driver {
    let stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut driver = Driver {
        frontend: Frontend::from_stream(stream, 16),
        ram: GuestRam::new(MEM_SIZE),
        features: 0,
        queues: Vec::new(),
    };
    let f = &mut driver.frontend;
    f.set_owner().expect("SET_OWNER");
    let offered = f.get_features().expect("GET_FEATURES");
    driver.features = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
    f.set_features(driver.features).expect("SET_FEATURES");
    let proto = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    // The device forwards only what it supports, whatever rvhost offers.
    assert_eq!(
        proto,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    );
    f.set_protocol_features(proto)
        .expect("SET_PROTOCOL_FEATURES");
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(f.get_queue_num().expect("GET_QUEUE_NUM") >= 1);
    driver.set_mem_table();
    driver.setup_queue(0);
    driver
}

#[test]
fn blk_io_through_the_virtio_vhost_user_transport() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let socket = vhost_support::socket_dir("vvu").join("vvu0.sock");
    let emu = EmuDevice::new(EmuConfig::default());
    emu.listen(&socket).expect("device socket");
    let device = VvuDevice::open(emu.transport()).expect("driver");

    let reactor = reactor::spawn(0, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown()))
        .expect("reactor");
    let bdev = malloc_bdev("vvu-malloc", 2048, 512);
    let controller: Arc<dyn DeviceBackend> = Arc::new(BlkController::new("vvu0", bdev, false));
    let mut server =
        VhostServer::start_vvu("vvu0", device, controller, Arc::clone(&reactor)).expect("server");

    let mut driver = connect(&socket);
    // virtio-blk config: capacity in 512-byte sectors.
    let config = driver.config();
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 2048);
    for (i, sector) in [0u64, 7, 1000, 2047].into_iter().enumerate() {
        let data = pattern(i as u8 + 1, 512);
        assert_eq!(driver.write_blocks(0, sector, &data), S_OK);
        let (status, back) = driver.read_blocks(0, sector, 512);
        assert_eq!(status, S_OK);
        assert_eq!(back, data, "sector {sector}");
    }
    // A larger request, many round trips through doorbells and notification interrupts.
    let data = pattern(42, 64 * 1024);
    for round in 0..50u64 {
        assert_eq!(driver.write_blocks(0, round * 8, &data[..4096]), S_OK);
    }
    assert_eq!(driver.write_blocks(0, 1024, &data), S_OK);
    assert_eq!(
        driver.read_blocks(0, 1024, data.len()),
        (S_OK, data.clone())
    );
    assert_eq!(server.sessions(), 1);

    // The frontend goes away; the next one is served by a new session on the same device.
    drop(driver);
    // (The device takes the next connection once the old one is gone and rvhost has set
    // BACKEND_UP again; until then the frontend's first request waits.)
    let mut driver = connect(&socket);
    let (status, back) = driver.read_blocks(0, 1024, 4096);
    assert_eq!(status, S_OK);
    assert_eq!(back, data[..4096]);
    assert_eq!(server.sessions(), 1, "the first session ended");
    drop(driver);
    server.stop();
    emu.stop(&socket);
}
