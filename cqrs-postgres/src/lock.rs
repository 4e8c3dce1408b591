//! Advisory lock keys.
//!
//! Every instance must derive the same key for the same thing, across builds and Rust
//! versions, so keys come from FNV-1a (fixed and tiny), not from `std`'s hasher. Keys are
//! 64-bit (the `bigint` advisory lock space): a collision between two live keys only makes
//! two unrelated holders wait for each other, and at 64 bits that is vanishingly rare.

/// FNV-1a over the parts, separated by a unit separator so `("ab", "c")` and `("a", "bc")`
/// differ.
pub(crate) fn key(parts: &[&str]) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash ^= 0x1f;
            hash = hash.wrapping_mul(PRIME);
        }
        for byte in part.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    // The bits as a bigint: Postgres has no unsigned integers.
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::key;

    #[test]
    fn keys_are_stable_and_separate_their_parts() {
        // Pinned: instances running different builds must agree on every key.
        assert_eq!(key(&[]), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_eq!(key(&["a"]), 0xaf63_dc4c_8601_ec8c_u64 as i64);
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_ne!(key(&["cqrs", "append"]), key(&["cqrs2", "append"]));
    }
}
