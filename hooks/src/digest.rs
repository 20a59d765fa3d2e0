//! A small streaming FNV-1a (64-bit) hash and the splitmix64 finaliser: fingerprints (of
//! unembeddings in lens files, of delphi's caches, SAEs and tokenizers, so that results made
//! from other inputs are refused rather than mixed) and deterministic seeds (synthetic
//! weights, per-latent sampling). Not cryptographic: it catches mistakes, not tampering.

/// FNV-1a over a stream of bytes.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Adds 32-bit words as little-endian bytes.
    pub fn u32s(self, words: &[u32]) -> Self {
        words.iter().fold(self, |h, w| h.bytes(&w.to_le_bytes()))
    }

    /// The hash so far.
    pub fn finish(self) -> u64 {
        self.0
    }

    /// The hash as text, as written to JSON files.
    pub fn hex(self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// The splitmix64 finaliser: spreads every input bit over the whole word (for seeds).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        assert_eq!(Fnv::default().finish(), 0xcbf29ce484222325);
        assert_eq!(Fnv::default().bytes(b"a").finish(), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv::default().bytes(b"foobar").finish(), 0x85944171f73967e8);
        assert_eq!(
            Fnv::default().u32s(&[0x6f6f66]).finish(),
            Fnv::default().bytes(b"foo\0").finish()
        );
    }
}
