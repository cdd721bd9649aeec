//! A bdev that grows under a connected vhost-user-blk frontend (the real `rvhost`, a null bdev
//! grown by SPDK's `bdev_null_resize`): the frontend gets `CONFIG_CHANGE_MSG` on the backend
//! channel it handed over (`SET_BACKEND_REQ_FD`), `GET_CONFIG` then reports the new capacity,
//! and the running queue accepts I/O past the old end, which it refused before. No cluster and
//! no guest: the plumbing every resizable bdev (rbd, null) uses, end to end.

mod rpc_common;
mod vhost_support;

use std::io::Read;
use std::os::unix::net::UnixStream;

use rpc_common::Target;
use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost_support::*;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;

fn capacity(driver: &mut Driver) -> u64 {
    let config = driver.config();
    u64::from_le_bytes(config[0..8].try_into().unwrap())
}

#[test]
fn blk_frontend_is_told_of_a_resize_and_io_past_the_old_end_works() {
    let target = Target::start("resize", &["--no-default"]);
    // 1 MiB: 2048 sectors of 512 bytes.
    target.ok(
        "bdev_null_create",
        json!({"name": "Null0", "num_blocks": 2048, "block_size": 512}),
    );
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.resize", "Null0"]);
    let socket = target.dir.join("vhost.resize");

    let mut driver = Driver::connect(&socket, VIRTIO_F_VERSION_1);
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ;
    driver
        .frontend
        .set_protocol_features(want)
        .expect("SET_PROTOCOL_FEATURES with BACKEND_REQ");
    let (mut channel, backend_end) = UnixStream::pair().unwrap();
    channel.set_read_timeout(Some(TIMEOUT)).unwrap();
    driver
        .frontend
        .set_backend_request_fd(&backend_end)
        .expect("SET_BACKEND_REQ_FD");
    drop(backend_end);
    driver.set_mem_table();
    driver.setup_queue(0);

    assert_eq!(capacity(&mut driver), 2048);
    let data = pattern(3, 4096);
    assert_eq!(driver.write_blocks(0, 2040, &data), S_OK);
    assert_eq!(
        driver.write_blocks(0, 3000, &data),
        S_IOERR,
        "past the end before the resize"
    );

    // Shrinking is refused (SPDK's rule), growing is announced.
    assert_eq!(
        target.err_code("bdev_null_resize", json!({"name": "Null0", "new_size": 0})),
        -22
    );
    assert_eq!(
        target.ok("bdev_null_resize", json!({"name": "Null0", "new_size": 2})),
        true
    );
    let mut header = [0u8; 12];
    channel
        .read_exact(&mut header)
        .expect("a CONFIG_CHANGE_MSG on the backend channel");
    assert_eq!(
        u32::from_le_bytes(header[0..4].try_into().unwrap()),
        CONFIG_CHANGE_MSG
    );
    assert_eq!(u32::from_le_bytes(header[8..12].try_into().unwrap()), 0);
    assert_eq!(capacity(&mut driver), 4096, "GET_CONFIG after the resize");
    assert_eq!(
        target.spdk_json(&["bdev_get_bdevs", "-b", "Null0"])[0]["num_blocks"],
        4096
    );
    assert_eq!(
        driver.write_blocks(0, 3000, &data),
        S_OK,
        "past the old end"
    );
    assert_eq!(
        driver.write_blocks(0, 4096, &data),
        S_IOERR,
        "past the new end"
    );

    // A frontend that connects afterwards sees the new size from the start.
    let mut late = Driver::ready(&socket, VIRTIO_F_VERSION_1);
    assert_eq!(capacity(&mut late), 4096);
    assert_eq!(late.write_blocks(0, 4000, &data), S_OK);
}
