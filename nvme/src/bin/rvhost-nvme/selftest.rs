//! The data-integrity exercise run inside the test guest: every chunk of the namespace written and
//! read back over several queue pairs in parallel (with contiguous, page-scattered and unaligned
//! buffers, so PRP lists and SGLs are both used), a controller reset with writes in flight, WRITE
//! ZEROES, DATASET MANAGEMENT deallocate and FLUSH. The final contents follow
//! [`SelftestLayout`], which the host checks in the backing file afterwards.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rvhost_nvme::pattern::{check_chunk, fill_block, ChunkContent, SelftestLayout, CHUNK_BYTES};
use rvhost_nvme::{
    Controller, ControllerConfig, ControllerState, DmaBuffer, DmaSegment, IoError, IoQueuePair,
    NamespaceInfo,
};

const CHUNK: usize = CHUNK_BYTES as usize;
/// Each command slot's buffer: one chunk plus room for the scattered and unaligned shapes.
const SLOT_BYTES: usize = CHUNK + 0x4000;
/// No single command may take longer than this, even under TCG.
const OP_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Write(u64),
    Read(ChunkContent),
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    chunk: u64,
    shape: u64,
}

/// `(offset in slot buffer, length)` pieces whose concatenation is the chunk.
fn shape_segments(shape: u64, sgl: bool) -> Vec<(usize, usize)> {
    match shape % 3 {
        0 => vec![(0, CHUNK)],
        // Whole pages, out of order: a PRP list of scattered pages.
        1 => {
            let pages = CHUNK / 4096;
            (0..pages)
                .map(|k| (((k * 7) % pages) * 4096, 4096))
                .collect()
        }
        // Byte-unaligned pieces: only SGLs can describe these.
        _ if sgl => vec![
            (0x104, 0x1F00),
            (0x3008, 0x8000),
            (0xB010, CHUNK - 0x1F00 - 0x8000),
        ],
        // Without SGLs: an unaligned first segment, which PRPs allow.
        _ => vec![(0x200, 0xE00), (0x2000, CHUNK - 0xE00)],
    }
}

struct Worker<'a> {
    qp: &'a mut IoQueuePair,
    buffer: DmaBuffer,
    ns: NamespaceInfo,
    qd: usize,
    sgl: bool,
    resets_seen: u64,
}

impl Worker<'_> {
    fn segments(&self, slot: usize, shape: u64) -> Vec<DmaSegment> {
        let base = self.buffer.iova() + (slot * SLOT_BYTES) as u64;
        shape_segments(shape, self.sgl)
            .into_iter()
            .map(|(off, len)| DmaSegment {
                iova: base + off as u64,
                len: len as u32,
            })
            .collect()
    }

    fn blocks_per_chunk(&self) -> u32 {
        (CHUNK_BYTES / u64::from(self.ns.block_size())) as u32
    }

    fn start(&mut self, slot: usize, op: Op) -> Result<(), IoError> {
        let segments = self.segments(slot, op.shape);
        let lba = op.chunk * u64::from(self.blocks_per_chunk());
        let blocks = self.blocks_per_chunk();
        match op.kind {
            OpKind::Write(generation) => {
                let mut data = vec![0u8; CHUNK];
                let bs = self.ns.block_size() as usize;
                for (i, block) in data.chunks_mut(bs).enumerate() {
                    fill_block(lba + i as u64, generation, block);
                }
                let mut pos = 0;
                for (off, len) in shape_segments(op.shape, self.sgl) {
                    // The slot lies inside the buffer (allocated as qd * SLOT_BYTES); were it not,
                    // the read-back check of this chunk fails.
                    if let Err(e) = self
                        .buffer
                        .write_at(slot * SLOT_BYTES + off, &data[pos..pos + len])
                    {
                        tracing::error!(%e, slot, "test buffer");
                    }
                    pos += len;
                }
                self.qp
                    .write(self.ns.nsid, lba, blocks, &segments, slot as u64)
            }
            OpKind::Read(_) => {
                // Poison the buffer so that a read that transfers nothing cannot pass.
                if let Err(e) = self.buffer.fill_at(slot * SLOT_BYTES, SLOT_BYTES, 0xA5) {
                    tracing::error!(%e, slot, "test buffer");
                }
                self.qp
                    .read(self.ns.nsid, lba, blocks, &segments, slot as u64)
            }
        }
    }

    fn finish(&self, slot: usize, op: Op) -> Result<()> {
        let OpKind::Read(expected) = op.kind else {
            return Ok(());
        };
        let mut data = vec![0u8; CHUNK];
        let mut pos = 0;
        for (off, len) in shape_segments(op.shape, self.sgl) {
            self.buffer
                .read_at(slot * SLOT_BYTES + off, &mut data[pos..pos + len])?;
            pos += len;
        }
        if let Err(lba) = check_chunk(op.chunk, self.ns.block_size() as usize, expected, &data) {
            bail!(
                "queue {}: chunk {} (shape {}) read back wrong at LBA {lba}: expected {expected:?}",
                self.qp.qid(),
                op.chunk,
                op.shape % 3
            );
        }
        Ok(())
    }

    /// Runs `ops` with up to `qd` in flight; commands failed by a reset are retried.
    /// `after_first_batch` runs once, when the first half of the first batch has been rung and
    /// the second half is queued behind the doorbell.
    fn run(&mut self, ops: &[Op], mut after_first_batch: Option<&mut dyn FnMut()>) -> Result<()> {
        let mut slots: Vec<Option<(Op, Instant)>> = vec![None; self.qd];
        let mut next = 0usize;
        let mut retry: Vec<Op> = Vec::new();
        let mut done = 0usize;
        while done < ops.len() {
            let first_batch = after_first_batch.is_some();
            for (slot, entry) in slots.iter_mut().enumerate() {
                if first_batch && slot == self.qd / 2 {
                    // The first half goes to the controller now; the second half stays queued
                    // behind the doorbell, so some commands are certainly in flight at the hook.
                    self.qp.ring();
                }
                if entry.is_some() {
                    continue;
                }
                let Some(op) = retry.pop().or_else(|| {
                    let op = ops.get(next).copied();
                    if op.is_some() {
                        next += 1;
                    }
                    op
                }) else {
                    break;
                };
                match self.start(slot, op) {
                    Ok(()) => *entry = Some((op, Instant::now())),
                    Err(IoError::Reset) => retry.push(op),
                    Err(e) => bail!("submitting {op:?}: {e}"),
                }
            }
            if let Some(hook) = after_first_batch.take() {
                hook();
            }
            self.qp.ring();
            let mut completions = Vec::new();
            self.qp.poll(usize::MAX, |tag, result| {
                completions.push((tag as usize, result))
            });
            for (slot, result) in completions {
                let Some((op, _)) = slots.get_mut(slot).and_then(Option::take) else {
                    bail!("completion for unknown slot {slot}");
                };
                match result {
                    Ok(()) => {
                        self.finish(slot, op)?;
                        done += 1;
                    }
                    Err(IoError::Reset) => {
                        self.resets_seen += 1;
                        retry.push(op);
                    }
                    Err(e) => bail!("{op:?} failed: {e}"),
                }
            }
            if let Some((op, at)) = slots
                .iter()
                .flatten()
                .find(|(_, at)| at.elapsed() > OP_DEADLINE)
            {
                bail!("{op:?} outstanding for {:?}", at.elapsed());
            }
        }
        Ok(())
    }

    /// Submits one command built by `submit` and waits for it.
    fn one(
        &mut self,
        what: &str,
        submit: impl FnOnce(&mut IoQueuePair) -> Result<(), IoError>,
    ) -> Result<()> {
        submit(self.qp).with_context(|| format!("submitting {what}"))?;
        self.qp.ring();
        let start = Instant::now();
        let mut result = None;
        while result.is_none() {
            self.qp.poll(1, |_, r| result = Some(r));
            if start.elapsed() > OP_DEADLINE {
                bail!("{what} did not complete");
            }
        }
        result
            .unwrap_or(Ok(()))
            .with_context(|| format!("{what} failed"))
    }
}

fn ops_for(
    chunks: impl Iterator<Item = u64>,
    kind: impl Fn(u64) -> OpKind,
    shape_shift: u64,
) -> Vec<Op> {
    chunks
        .map(|chunk| Op {
            kind: kind(chunk),
            chunk,
            shape: chunk + shape_shift,
        })
        .collect()
}

pub fn run(ctrl: &Controller, nsid: u32, queues: u16, qd: u16) -> Result<()> {
    let ns = ctrl
        .namespaces()
        .iter()
        .find(|n| n.nsid == nsid)
        .with_context(|| format!("no namespace {nsid}"))?
        .clone();
    let layout = SelftestLayout::new(ns.size_bytes()).context("namespace below 2 MiB")?;
    if CHUNK_BYTES % u64::from(ns.block_size()) != 0 {
        bail!(
            "block size {} does not divide the chunk size",
            ns.block_size()
        );
    }
    let sgl = ctrl.sgl_support().supported;
    let queues = queues.clamp(1, ctrl.io_queues_granted());
    let qd = usize::from(qd.max(1));
    println!(
        "selftest: nsid {nsid}, {} chunks of {CHUNK} B, {queues} queues x qd {qd}, SGL {}",
        layout.chunks,
        match (sgl, ctrl.sgl_support().prefer) {
            (true, true) => "for every transfer",
            (true, false) => "where PRPs cannot describe the buffer",
            _ => "off (PRPs only)",
        }
    );
    let mut qps: Vec<IoQueuePair> = (0..queues)
        .map(|_| ctrl.create_io_queue_pair(qd as u16 + 1))
        .collect::<Result<_, _>>()?;
    let mut workers: Vec<Worker<'_>> = Vec::new();
    for qp in qps.iter_mut() {
        workers.push(Worker {
            qp,
            buffer: ctrl.allocate_dma(qd * SLOT_BYTES)?,
            ns: ns.clone(),
            qd,
            sgl,
            resets_seen: 0,
        });
    }
    let nq = u64::from(queues);
    let started = Instant::now();

    // Phase 1: every chunk written (generation 1) and read back, striped over the queues in
    // parallel threads, with a different buffer shape for the read than for the write.
    std::thread::scope(|s| -> Result<()> {
        let layout = &layout;
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(q, w)| {
                s.spawn(move || -> Result<()> {
                    let mine = || (q as u64..layout.chunks).step_by(nq as usize);
                    w.run(&ops_for(mine(), |_| OpKind::Write(1), 0), None)?;
                    w.one("flush", |qp| qp.flush(nsid, 0))?;
                    w.run(
                        &ops_for(mine(), |_| OpKind::Read(ChunkContent::Generation(1)), 1),
                        None,
                    )
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(())
    })?;
    println!(
        "phase 1 ok: {} chunks written and verified in {:?}",
        layout.chunks,
        started.elapsed()
    );

    // Phase 2: generation 2 over the reset chunks, with a controller reset issued while the
    // first batch is in flight; commands failed by the reset are retried.
    let reset_ops = ops_for(layout.reset_chunks.clone(), |_| OpKind::Write(2), 2);
    let mut reset_result = None;
    let mut reset_now = || reset_result = Some(ctrl.reset());
    workers[0].run(&reset_ops, Some(&mut reset_now))?;
    reset_result
        .context("reset hook did not run")?
        .context("controller reset")?;
    // At least the commands queued behind the doorbell must have been failed by the reset.
    let queued_behind_doorbell = (qd - qd / 2) as u64;
    if workers[0].resets_seen < queued_behind_doorbell {
        bail!(
            "only {} commands failed with Reset, {queued_behind_doorbell} were queued across it",
            workers[0].resets_seen
        );
    }
    println!(
        "phase 2 ok: controller reset with I/O in flight, {} commands failed with Reset and were retried",
        workers[0].resets_seen
    );

    // Phase 3: WRITE ZEROES (half with DEAC) and deallocate, on the last queue (which re-creates
    // its queues after the reset on first use).
    let last = workers.len() - 1;
    let w = &mut workers[last];
    let bpc = u64::from(w.blocks_per_chunk());
    let z = &layout.zeroed_chunks;
    let half = z.start + (z.end - z.start) / 2;
    let zero_blocks = |from: u64, to: u64| ((to - from) * bpc) as u32;
    w.one("write zeroes", |qp| {
        qp.write_zeroes(nsid, z.start * bpc, zero_blocks(z.start, half), false, 0)
    })?;
    w.one("write zeroes (deac)", |qp| {
        qp.write_zeroes(nsid, half * bpc, zero_blocks(half, z.end), true, 0)
    })?;
    let d = &layout.deallocated_chunks;
    // Two ranges, to exercise the range list.
    let dmid = d.start + (d.end - d.start) / 2;
    let ranges = [
        (d.start * bpc, zero_blocks(d.start, dmid)),
        (dmid * bpc, zero_blocks(dmid, d.end)),
    ];
    w.one("deallocate", |qp| qp.deallocate(nsid, &ranges, 0))?;
    w.one("flush", |qp| qp.flush(nsid, 0))?;
    println!("phase 3 ok: write zeroes, deallocate, flush");

    // Phase 4: the whole namespace read back against the final layout, in parallel.
    std::thread::scope(|s| -> Result<()> {
        let layout = &layout;
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(q, w)| {
                s.spawn(move || -> Result<()> {
                    let mine = (q as u64..layout.chunks).step_by(nq as usize);
                    w.run(
                        &ops_for(mine, |c| OpKind::Read(layout.expected(c)), 0),
                        None,
                    )
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(())
    })?;
    println!(
        "phase 4 ok: final contents verified in {:?} total",
        started.elapsed()
    );

    // Error paths that need no hardware fault: out of range and malformed buffers are refused
    // before reaching the controller.
    let w = &mut workers[0];
    let seg = w.segments(0, 0);
    let past_end = ns.size_blocks;
    match w.qp.read(nsid, past_end, 1, &seg[..1], 0) {
        Err(IoError::OutOfRange { .. }) => {}
        other => bail!("read past the end was not refused: {other:?}"),
    }
    match w.qp.read(nsid, 0, 1, &seg, 0) {
        Err(IoError::Length { .. }) => {}
        other => bail!("length mismatch was not refused: {other:?}"),
    }

    // Phase 5a: zero copy from caller memory. Memory the driver did not allocate (as guest memory
    // will be) is mapped with `map_dma` and used directly as the I/O buffer.
    caller_memory_io(ctrl, &mut workers[0], &layout)?;
    println!("phase 5a ok: write and read through caller memory mapped with map_dma (zero copy)");

    // Phase 5: a stalled controller. The doorbell is held, so the command is never fetched: it
    // must time out, be aborted, time out again and end in a controller reset that fails it with
    // Reset; the queue must then work again.
    let timeout = Duration::from_millis(300);
    ctrl.set_io_timeout(timeout);
    let resets_before = ctrl.reset_count();
    let w = &mut workers[0];
    w.qp.hold_doorbell(true);
    let seg = w.segments(0, 0);
    let blocks = w.blocks_per_chunk();
    let stalled_at = Instant::now();
    w.qp.read(nsid, 0, blocks, &seg, 7)
        .context("submitting the stalled read")?;
    let mut outcome = None;
    while outcome.is_none() {
        w.qp.poll(1, |tag, r| outcome = Some((tag, r)));
        if stalled_at.elapsed() > OP_DEADLINE {
            bail!("a stalled command was never timed out");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let waited = stalled_at.elapsed();
    w.qp.hold_doorbell(false);
    ctrl.set_io_timeout(ControllerConfig::default().io_timeout);
    match outcome {
        Some((7, Err(IoError::Reset))) => {}
        other => bail!("stalled command ended as {other:?}, expected a Reset failure"),
    }
    if waited < 2 * timeout || ctrl.reset_count() != resets_before + 1 {
        bail!(
            "stalled command failed after {waited:?} with {} resets",
            ctrl.reset_count()
        );
    }
    let check = [Op {
        kind: OpKind::Read(layout.expected(0)),
        chunk: 0,
        shape: 0,
    }];
    w.run(&check, None).context("I/O after the timeout reset")?;
    println!("phase 5 ok: stalled command aborted, then reset after {waited:?}; queue works again");

    // Phase 6: surprise removal (simulated: BAR0 reads all-ones from now on) with reads in flight
    // on every queue: each must fail with ControllerFailed within a bounded time, and new I/O
    // must fail at once. The reads sit behind a held doorbell, as commands a vanished device
    // never completes; commands the (emulated, still alive) device had really fetched would go
    // on DMAing into buffers this process frees once the I/O has failed.
    let mut queued = 0usize;
    for w in workers.iter_mut() {
        w.qp.hold_doorbell(true);
        for slot in 0..w.qd {
            let chunk = slot as u64;
            let op = Op {
                kind: OpKind::Read(layout.expected(chunk)),
                chunk,
                shape: 0,
            };
            w.start(slot, op).context("submitting before removal")?;
            queued += 1;
        }
    }
    ctrl.simulate_surprise_removal();
    let removed_at = Instant::now();
    let (mut ok, mut failed) = (0usize, 0usize);
    for w in workers.iter_mut() {
        while w.qp.in_flight() > 0 {
            let mut bad = None;
            w.qp.poll(usize::MAX, |_, r| match r {
                Ok(()) => ok += 1,
                Err(IoError::ControllerFailed) => failed += 1,
                Err(e) => bad = Some(e),
            });
            if let Some(e) = bad {
                bail!("I/O after removal failed with {e}, expected ControllerFailed");
            }
            if removed_at.elapsed() > Duration::from_secs(10) {
                bail!("I/O still in flight 10 s after removal");
            }
        }
        match w.qp.read(nsid, 0, blocks, &seg, 0) {
            Err(IoError::ControllerFailed) => {}
            other => bail!("submission after removal returned {other:?}"),
        }
    }
    if ctrl.state() != ControllerState::Failed || failed != queued || ok != 0 {
        bail!(
            "removal not handled: state {:?}, {failed} of {queued} failed, {ok} completed",
            ctrl.state()
        );
    }
    println!(
        "phase 6 ok: removal detected in {:?}; all {failed} commands in flight failed",
        removed_at.elapsed()
    );
    drop(workers);
    drop(qps);
    Ok(())
}

/// Reads the raw image at `path` and checks every chunk against the self test's final layout;
/// returns the number of chunks checked.
pub fn verify_image(path: &std::path::Path, block_size: usize) -> Result<u64> {
    use std::io::Read;
    if block_size == 0 || CHUNK % block_size != 0 {
        bail!("block size {block_size} does not divide the chunk size");
    }
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let layout = SelftestLayout::new(len).context("image below 2 MiB")?;
    let mut data = vec![0u8; CHUNK];
    for chunk in 0..layout.chunks {
        file.read_exact(&mut data)
            .with_context(|| format!("reading chunk {chunk}"))?;
        let expected = layout.expected(chunk);
        if let Err(lba) = check_chunk(chunk, block_size, expected, &data) {
            bail!("image chunk {chunk}: LBA {lba} does not hold {expected:?}");
        }
    }
    Ok(layout.chunks)
}

/// Anonymous memory owned by the self test, unmapped on drop.
struct CallerMemory {
    ptr: *mut u8,
    len: usize,
}

impl CallerMemory {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh anonymous private mapping at a kernel-chosen address replaces nothing;
        // the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(CallerMemory {
            ptr: ptr.cast(),
            len,
        })
    }

    fn copy_in(&self, data: &[u8]) {
        let n = data.len().min(self.len);
        // SAFETY: `n` bytes fit the mapping; no I/O to it is in flight while the test copies, and
        // only raw pointers touch it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, n) };
    }

    fn copy_out(&self, data: &mut [u8]) {
        let n = data.len().min(self.len);
        // SAFETY: as in `copy_in`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, data.as_mut_ptr(), n) };
    }
}

impl Drop for CallerMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, no longer mapped for DMA when this runs.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn caller_memory_io(ctrl: &Controller, w: &mut Worker<'_>, layout: &SelftestLayout) -> Result<()> {
    let chunk = layout.reset_chunks.end + 8;
    let expected = layout.expected(chunk);
    if expected != ChunkContent::Generation(1) {
        bail!("chunk {chunk} is not a plain generation-1 chunk in this layout");
    }
    let mem = CallerMemory::new(CHUNK)?;
    let iova = mem.ptr as u64;
    // SAFETY: `mem` is page-aligned anonymous memory of this process that stays mapped until
    // after `unmap_dma` below, and is only accessed through raw pointers meanwhile.
    unsafe { ctrl.map_dma(iova, CHUNK as u64) }.context("map_dma of caller memory")?;
    let result = (|| -> Result<()> {
        let nsid = w.ns.nsid;
        let bpc = w.blocks_per_chunk();
        let lba = chunk * u64::from(bpc);
        let seg = [DmaSegment {
            iova,
            len: CHUNK as u32,
        }];
        // Zero the chunk first, so that a write that transferred nothing cannot pass.
        w.one("write zeroes", |qp| {
            qp.write_zeroes(nsid, lba, bpc, false, 0)
        })?;
        let mut data = vec![0u8; CHUNK];
        for (i, block) in data.chunks_mut(w.ns.block_size() as usize).enumerate() {
            fill_block(lba + i as u64, 1, block);
        }
        mem.copy_in(&data);
        w.one("zero-copy write", |qp| qp.write(nsid, lba, bpc, &seg, 0))?;
        mem.copy_in(&vec![0xA5; CHUNK]);
        w.one("zero-copy read", |qp| qp.read(nsid, lba, bpc, &seg, 0))?;
        mem.copy_out(&mut data);
        if let Err(bad) = check_chunk(chunk, w.ns.block_size() as usize, expected, &data) {
            bail!("zero-copy read back wrong at LBA {bad}");
        }
        Ok(())
    })();
    ctrl.unmap_dma(iova, CHUNK as u64)
        .context("unmap_dma of caller memory")?;
    result
}
