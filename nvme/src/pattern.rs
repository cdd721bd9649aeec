//! Deterministic block contents for data-integrity tests: what the guest self test writes and what
//! the host-side verifier expects to find in the backing file afterwards.

/// The splitmix64 finaliser: a cheap bijective mix, so distinct inputs give distinct words.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `block` (one logical block) with the pattern of `lba` in write generation `generation`.
/// The first word is the LBA itself so that a misdirected write is easy to diagnose.
pub fn fill_block(lba: u64, generation: u64, block: &mut [u8]) {
    for (i, word) in block.chunks_mut(8).enumerate() {
        let value = if i == 0 {
            lba
        } else {
            mix(lba ^ (generation << 56) ^ ((i as u64) << 40))
        };
        let bytes = value.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

/// Whether `block` holds the pattern of `lba` in `generation`.
pub fn check_block(lba: u64, generation: u64, block: &[u8]) -> bool {
    let mut expected = vec![0u8; block.len()];
    fill_block(lba, generation, &mut expected);
    expected == block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_lba_and_generation() {
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        fill_block(7, 1, &mut a);
        fill_block(7, 1, &mut b);
        assert_eq!(a, b);
        assert!(check_block(7, 1, &a));
        assert_eq!(&a[0..8], &7u64.to_le_bytes());
        fill_block(8, 1, &mut b);
        assert_ne!(a[8..], b[8..]);
        assert!(!check_block(7, 1, &b));
        fill_block(7, 2, &mut b);
        assert!(!check_block(7, 1, &b));
        assert!(!check_block(7, 1, &[0u8; 512]));
    }
}

/// Bytes per chunk of the self-test layout.
pub const CHUNK_BYTES: u64 = 64 * 1024;

/// What one chunk of the namespace holds at the end of the self test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkContent {
    /// Every block holds [`fill_block`] of its LBA in this generation.
    Generation(u64),
    /// Zeroes (WRITE ZEROES, or DATASET MANAGEMENT deallocate on a medium that reads holes back
    /// as zeroes, such as a raw file with discard enabled).
    Zeroes,
}

/// The self test's plan for a namespace, shared by the guest program and the host verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelftestLayout {
    /// Number of whole chunks in the namespace.
    pub chunks: u64,
    /// Chunks rewritten in generation 2 across a forced controller reset.
    pub reset_chunks: core::ops::Range<u64>,
    /// Chunks cleared with WRITE ZEROES (the first half without, the second with DEAC).
    pub zeroed_chunks: core::ops::Range<u64>,
    /// Chunks deallocated with DATASET MANAGEMENT.
    pub deallocated_chunks: core::ops::Range<u64>,
}

impl SelftestLayout {
    /// The layout for a namespace of `bytes` bytes; `None` below 2 MiB (32 chunks).
    pub fn new(bytes: u64) -> Option<Self> {
        let chunks = bytes / CHUNK_BYTES;
        if chunks < 32 {
            return None;
        }
        let mid = chunks / 2;
        Some(SelftestLayout {
            chunks,
            reset_chunks: 0..(chunks / 4).min(32),
            zeroed_chunks: mid..mid + 4,
            deallocated_chunks: mid + 8..(mid + 12).min(chunks),
        })
    }

    /// What chunk `chunk` holds after the test.
    pub fn expected(&self, chunk: u64) -> ChunkContent {
        if self.zeroed_chunks.contains(&chunk) || self.deallocated_chunks.contains(&chunk) {
            ChunkContent::Zeroes
        } else if self.reset_chunks.contains(&chunk) {
            ChunkContent::Generation(2)
        } else {
            ChunkContent::Generation(1)
        }
    }
}

/// Checks one chunk's bytes (`bytes.len() == CHUNK_BYTES`) against `expected`; on mismatch returns
/// the first LBA that differs.
pub fn check_chunk(
    chunk: u64,
    block_size: usize,
    expected: ChunkContent,
    bytes: &[u8],
) -> Result<(), u64> {
    let blocks_per_chunk = CHUNK_BYTES / block_size as u64;
    for (i, block) in bytes.chunks(block_size).enumerate() {
        let lba = chunk * blocks_per_chunk + i as u64;
        let ok = match expected {
            ChunkContent::Zeroes => block.iter().all(|&b| b == 0),
            ChunkContent::Generation(generation) => check_block(lba, generation, block),
        };
        if !ok {
            return Err(lba);
        }
    }
    Ok(())
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn layout_for_32_mib() {
        let l = SelftestLayout::new(32 << 20).unwrap();
        assert_eq!(l.chunks, 512);
        assert_eq!(l.reset_chunks, 0..32);
        assert_eq!(l.expected(0), ChunkContent::Generation(2));
        assert_eq!(l.expected(40), ChunkContent::Generation(1));
        assert_eq!(l.expected(257), ChunkContent::Zeroes);
        assert_eq!(l.expected(265), ChunkContent::Zeroes);
        assert_eq!(l.expected(260), ChunkContent::Generation(1));
        assert!(SelftestLayout::new(1 << 20).is_none());
    }

    #[test]
    fn chunk_check_finds_first_bad_lba() {
        let bs = 4096;
        let mut bytes = vec![0u8; CHUNK_BYTES as usize];
        for (i, block) in bytes.chunks_mut(bs).enumerate() {
            fill_block(16 * 3 + i as u64, 1, block);
        }
        assert_eq!(
            check_chunk(3, bs, ChunkContent::Generation(1), &bytes),
            Ok(())
        );
        assert_eq!(
            check_chunk(3, bs, ChunkContent::Generation(2), &bytes),
            Err(48)
        );
        bytes[5 * bs + 100] ^= 1;
        assert_eq!(
            check_chunk(3, bs, ChunkContent::Generation(1), &bytes),
            Err(53)
        );
        assert_eq!(
            check_chunk(3, bs, ChunkContent::Zeroes, &vec![0; 65536]),
            Ok(())
        );
    }
}
