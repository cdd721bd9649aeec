//! The rvhost vhost-user storage target: reactors, bdevs, vhost-blk/scsi controllers, JSON-RPC.
