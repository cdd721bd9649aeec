//! rvhost-vvu's driver against the emulated virtio-vhost-user device: initialization through both
//! transports (direct and VFIO), the message tunnel with a real vhost-user frontend on the socket,
//! the shared memory window, doorbells and kick notifications, and the rejection of a hostile
//! device.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::{bit, feature};
use rvhost_platform_linux::RegionSpec;
use rvhost_vvu::pci::{device_cfg, CapsError};
use rvhost_vvu::vfio::VfioTransport;
use rvhost_vvu::{VirtioPciTransport, VvuDevice, VvuError};
use rvhost_vvu_emu::{EmuConfig, EmuDevice, Fault, SHARED_MEMORY_AT};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd as VmmEventFd;

const TIMEOUT: Duration = Duration::from_secs(10);

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rvhost-vvu-{name}-{}.sock", std::process::id()))
}

fn memfd(len: u64) -> std::fs::File {
    let name = std::ffi::CString::new("vvu-test").unwrap();
    // SAFETY: a plain system call with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A vhost-user reply to `request` with a `u64` payload.
fn reply_u64(request: u32, value: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(1u32 | 4).to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

#[test]
fn the_driver_initializes_the_device_through_both_transports() {
    let emu = EmuDevice::new(EmuConfig::default());
    let dev = VvuDevice::open(emu.transport()).unwrap();
    assert_eq!(dev.max_vhost_queues(), 8);
    assert_eq!(
        dev.features(),
        bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_EVENT_IDX)
    );
    assert_eq!(emu.connection_status(), device_cfg::STATUS_BACKEND_UP);
    assert_eq!(
        emu.device_status() & 0x0f,
        0x0f,
        "DRIVER_OK and FEATURES_OK"
    );
    assert_eq!(emu.error(), None);
    drop(dev);

    // The same device through the VFIO transport: region indices, bounds, MSI-X and DMA set-up
    // go through VFIO's device model.
    let emu = EmuDevice::new(EmuConfig::default());
    let dev = VvuDevice::open(VfioTransport::new(emu.vfio())).unwrap();
    assert_eq!(emu.connection_status(), device_cfg::STATUS_BACKEND_UP);
    assert_eq!(dev.caps().shared_memory.offset, SHARED_MEMORY_AT);
    // Out-of-range accesses are refused by the transport itself.
    let t = dev.transport();
    assert!(t.read_config(255, &mut [0u8; 2]).is_err());
    assert!(t.read_bar(0, 0x4000 - 2, &mut [0u8; 4]).is_err());
    assert!(t.read_bar(1, 0, &mut [0u8; 4]).is_err());
    assert!(
        t.bar_mappable(0, 0, 0x1000).is_err(),
        "BAR 0 is not mappable"
    );
}

#[test]
fn a_hostile_device_is_rejected() {
    for fault in [Fault::DeviceCapOutsideBar, Fault::CapListLoop] {
        let emu = EmuDevice::new(EmuConfig {
            fault,
            ..EmuConfig::default()
        });
        let err = VvuDevice::open(emu.transport()).unwrap_err();
        match (fault, &err) {
            (Fault::DeviceCapOutsideBar, VvuError::Caps(CapsError::BadRegion { .. })) => {}
            (Fault::CapListLoop, VvuError::Caps(CapsError::BadList(_))) => {}
            _ => panic!("{fault:?}: unexpected {err}"),
        }
    }
    // An rxq message that is not a whole vhost-user message.
    let emu = EmuDevice::new(EmuConfig::default());
    let mut dev = VvuDevice::open(emu.transport()).unwrap();
    emu.inject_rx(vec![1, 0, 0, 0, 1, 0, 0, 0, 200, 0, 0, 0, 0]);
    assert!(matches!(
        dev.wait_message(TIMEOUT),
        Err(VvuError::BadMessage(_))
    ));
    emu.inject_rx(vec![1, 2, 3]);
    assert!(matches!(
        dev.wait_message(TIMEOUT),
        Err(VvuError::BadMessage(_))
    ));
    // The buffers went back: a good message still arrives.
    emu.inject_rx(reply_u64(1, 7)[..].to_vec());
    assert!(dev.wait_message(TIMEOUT).unwrap().is_some());
    // Memory tables that do not fit the BAR, or name unmapped window ranges.
    let huge = RegionSpec {
        guest_phys_addr: 0,
        memory_size: 1 << 40,
        userspace_addr: 0,
        mmap_offset: 0,
    };
    assert!(matches!(
        dev.map_frontend_memory(&[huge]),
        Err(VvuError::BadMemoryRegion { index: 0, .. })
    ));
    let overflow = RegionSpec {
        mmap_offset: u64::MAX,
        memory_size: 0x1000,
        ..huge
    };
    assert!(matches!(
        dev.map_frontend_memory(&[overflow]),
        Err(VvuError::BadMemoryRegion { index: 0, .. })
    ));
    let unmapped = RegionSpec {
        memory_size: 0x1000,
        ..huge
    };
    assert!(dev.map_frontend_memory(&[unmapped]).is_err());
    // Replies that are not whole messages are not sent.
    assert!(matches!(
        dev.send_message(&[1, 0, 0, 0]),
        Err(VvuError::BadReply(_))
    ));
    assert!(matches!(dev.doorbell(8), Err(VvuError::NoSuchVring { .. })));
}

/// The frontend's side of the tunnel test, on its own thread (its calls block on replies).
/// Returns the frontend, so the connection (and with it the call fd) outlives the checks.
fn frontend_session(
    path: PathBuf,
    memory: OwnedFd,
    call: VmmEventFd,
    kick: VmmEventFd,
) -> Frontend {
    let mut frontend = Frontend::connect(&path, 2).unwrap();
    frontend.set_owner().unwrap();
    assert_eq!(frontend.get_features().unwrap(), 0x1_4000_0000);
    frontend.set_features(0x1_4000_0000 | (1 << 30)).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    // The device masks what the backend offers to what it can forward.
    assert_eq!(
        protocol,
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    );
    frontend.set_protocol_features(protocol).unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0x4000_0000,
        memory_size: 0x10_0000,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0x1000,
        mmap_handle: memory.as_raw_fd(),
    };
    frontend.set_mem_table(&[region]).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    // A synchronous request last: everything before it has been forwarded.
    assert_eq!(frontend.get_features().unwrap(), 0x1_4000_0000);
    frontend
}

#[test]
fn vhost_user_messages_tunnel_through_the_rxq_and_txq() {
    let path = socket_path("tunnel");
    let emu = EmuDevice::new(EmuConfig::default());
    emu.listen(&path).unwrap();
    let mut dev = VvuDevice::open(emu.transport()).unwrap();

    // The frontend VM's memory: 1 MiB at file offset 0x1000, with a pattern the backend reads
    // through the shared memory window.
    let mut file = memfd(0x10_1000);
    file.write_all(&[0u8; 0x1000]).unwrap();
    file.write_all(b"frontend guest memory").unwrap();
    let call = VmmEventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = VmmEventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (call2, kick2) = (call.try_clone().unwrap(), kick.try_clone().unwrap());
    let fd = OwnedFd::from(file);
    let frontend_path = path.clone();
    let frontend = std::thread::spawn(move || frontend_session(frontend_path, fd, call2, kick2));

    let mut requests = Vec::new();
    let mut memory = None;
    let mut get_features = 0;
    while get_features < 2 {
        let message = dev
            .wait_message(TIMEOUT)
            .unwrap()
            .unwrap_or_else(|| panic!("no message after {requests:?}: {:?}", emu.error()));
        let request = le32(&message, 0);
        requests.push(request);
        match request {
            1 => {
                get_features += 1;
                dev.send_message(&reply_u64(1, 0x1_4000_0000)).unwrap();
            }
            // GET_PROTOCOL_FEATURES: offer more than the device can forward (all of the first
            // ten but REPLY_ACK, which this test does not answer).
            15 => dev.send_message(&reply_u64(15, 0x3f7)).unwrap(),
            // SET_PROTOCOL_FEATURES arrives masked by the device.
            16 => assert_eq!(le64(&message, 12), 0x201),
            5 => {
                let payload = &message[12..];
                assert_eq!(le32(payload, 0), 1, "one region");
                let region = RegionSpec {
                    guest_phys_addr: le64(payload, 8),
                    memory_size: le64(payload, 16),
                    userspace_addr: le64(payload, 24),
                    mmap_offset: le64(payload, 32),
                };
                memory = Some(dev.map_frontend_memory(&[region]).unwrap());
            }
            _ => {}
        }
    }
    let frontend = frontend.join().unwrap();
    assert_eq!(requests, [3, 1, 2, 15, 16, 5, 13, 12, 1]);

    // The frontend's memory, by its guest physical address, through the window.
    let memory = memory.unwrap();
    let mut text = [0u8; 21];
    memory.read(0x4000_0000, &mut text).unwrap();
    assert_eq!(&text, b"frontend guest memory");
    // Writes land in the frontend's file.
    memory.write(0x4000_0000 + 0x8_0000, b"backend").unwrap();

    // Doorbell 0 signals the frontend's call fd; a kick raises vring 0's vector.
    dev.doorbell(0).unwrap();
    assert_eq!(call.read().unwrap(), 1);
    kick.write(1).unwrap();
    let vector = &dev.interrupts().vrings[0];
    assert!(vector.wait(TIMEOUT).unwrap());
    assert_eq!(emu.forwarded(), (9, 3));
    drop(frontend);
    emu.stop(&path);
}

#[test]
fn the_connection_follows_backend_up_and_frontend_disconnects() {
    let path = socket_path("conn");
    let emu = EmuDevice::new(EmuConfig::default());
    emu.listen(&path).unwrap();
    let mut dev = VvuDevice::open(emu.transport()).unwrap();
    assert!(!dev.frontend_up().unwrap());
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !dev.frontend_up().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "FRONTEND_UP never set"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The configuration-change interrupt came with it.
    assert!(dev.interrupts().config.wait(TIMEOUT).unwrap());
    let _ = dev.interrupts().config.consume();
    // A frontend that goes away drops the connection, with an interrupt.
    drop(stream);
    assert!(dev.interrupts().config.wait(TIMEOUT).unwrap());
    assert_eq!(dev.connection_status().unwrap(), 0);
    assert!(dev.recv_message().unwrap().is_none());
    // A protocol violation (a reply from the frontend) also drops it.
    dev.set_backend_up(true).unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    while !dev.frontend_up().unwrap() {
        std::thread::sleep(Duration::from_millis(5));
    }
    stream.write_all(&reply_u64(1, 0)).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while dev.frontend_up().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "violation not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(dev.recv_message().unwrap().is_none());
    emu.stop(&path);
    let _ = Arc::strong_count(&emu);
}
