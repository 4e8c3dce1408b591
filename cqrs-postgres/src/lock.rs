//! Advisory lock keys.
//!
//! Every instance must derive the same key for the same thing, across builds and Rust
//! versions, so keys come from FNV-1a (fixed and tiny), not from `std`'s hasher. Keys are
//! 64-bit: a collision between two live keys only makes two unrelated holders wait for each
//! other, and by chance, at 64 bits, that is vanishingly rare.
//!
//! Not by design, though: FNV-1a is no cryptographic hash, and whoever chooses the text can
//! aim at a key. So Postgres's two advisory lock spaces are kept apart by who names the lock
//! (the `bigint` locks and the two-`int4` locks never conflict: their lock tags differ):
//!
//! * the `bigint` space holds the system's locks, named by the deployment alone: the schema's
//!   append lock, projection consumers (named in code), sqlx's migration lock;
//! * the two-`int4` space ([`pair`]) holds every lock a client's text names: idempotency keys
//!   and their fingerprint marks. A crafted key can at worst make claims of other keys wait
//!   (or, aimed at a key its author knows, fail that key's first claim as a fingerprint
//!   mismatch while it holds its own), never an append.

/// The byte between two parts.
const SEPARATOR: u8 = 0x1f;
/// Put before a part's own `SEPARATOR` and `ESCAPE` bytes, so no part can pass for two.
const ESCAPE: u8 = 0x1b;

/// FNV-1a over the parts, separated by a unit separator so `("ab", "c")` and `("a", "bc")`
/// differ. A separator or escape byte inside a part is escaped, so `("k\x1ff")` and
/// `("k", "f")` differ too; parts without those bytes hash as they always did.
pub(crate) fn key(parts: &[&str]) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    };
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            feed(SEPARATOR);
        }
        for &byte in part.as_bytes() {
            if byte == SEPARATOR || byte == ESCAPE {
                feed(ESCAPE);
            }
            feed(byte);
        }
    }
    // The bits as a bigint: Postgres has no unsigned integers.
    hash as i64
}

/// A key as the two `int4` halves of a two-key advisory lock (`pg_advisory_xact_lock(int4,
/// int4)`): high 32 bits, low 32 bits.
pub(crate) fn pair(key: i64) -> (i32, i32) {
    ((key >> 32) as i32, key as i32)
}

#[cfg(test)]
mod tests {
    use super::{key, pair};

    #[test]
    fn a_pair_is_the_two_halves_of_a_key() {
        assert_eq!(pair(0x0000_0001_0000_0002), (1, 2));
        assert_eq!(pair(-1), (-1, -1));
        assert_eq!(pair(0x7fff_ffff_8000_0000), (i32::MAX, i32::MIN));
    }

    #[test]
    fn keys_are_stable_and_separate_their_parts() {
        // Pinned: instances running different builds must agree on every key.
        assert_eq!(key(&[]), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_eq!(key(&["a"]), 0xaf63_dc4c_8601_ec8c_u64 as i64);
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_ne!(key(&["cqrs", "append"]), key(&["cqrs2", "append"]));
        assert_eq!(
            key(&["ab", "c"]),
            0xfd86_a083_ef3e_ee44_u64 as i64,
            "keys without separator bytes are as before"
        );
    }

    #[test]
    fn a_part_holding_the_separator_does_not_pass_for_two() {
        assert_ne!(key(&["k\x1ff"]), key(&["k", "f"]));
        assert_ne!(key(&["a\x1f", "b"]), key(&["a", "\x1fb"]));
        assert_ne!(key(&["a\x1b", "b"]), key(&["a", "\x1bb"]));
    }
}
