//! The stable partition function.
//!
//! `partition = fnv1a_32(utf8(partition_key)) mod P`, with the 32-bit FNV-1a hash
//! (offset basis 2166136261, prime 16777619). It is simple enough to write in any language
//! and in PL/pgSQL (the PostgreSQL `enqueue` function computes the same value), and it never
//! changes between releases: changing it would break per-key order for rows already stored.

/// 32-bit FNV-1a over the bytes.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 2_166_136_261;
    const PRIME: u32 = 16_777_619;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(PRIME)
    })
}

/// The partition of `partition_key` among `partitions` (which must be at least 1).
pub fn partition_for(partition_key: &str, partitions: u32) -> u32 {
    fnv1a_32(partition_key.as_bytes()) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_fnv1a_vectors() {
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn spreads_keys_over_partitions() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_for(&format!("order/{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (700..1300).contains(&c)),
            "{counts:?}"
        );
    }
}
