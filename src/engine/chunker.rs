//! The chunker: how many items go into the next chunk, adapting to the task's cost.

use crate::wire::transport::inline_limit;

/// Work per chunk the adaptive sizer aims for.
pub(crate) const TARGET_CHUNK_NANOS: f64 = 1_000_000.0;

/// Encoded bytes per chunk the adaptive sizer stays under (one item may pass it):
/// as large as fits one socket packet with its header and an item of slack, since
/// larger frames mean fewer messages and wake-ups per item.
///
/// Follows [`inline_limit`], which follows the host's socket buffer size: about
/// 199 KiB with Linux's default buffer. Cheap to call (a cached value and a subtraction).
pub(crate) fn target_chunk_bytes() -> usize {
    chunk_bytes_within(inline_limit())
}

/// Room kept in a packet beyond the target for the header and the item that crosses it.
const CHUNK_SLACK: usize = 8 * 1024;

fn chunk_bytes_within(inline: usize) -> usize {
    // On a host with a tiny socket buffer, half the packet is still left as slack;
    // the target stays at least 1 so that every chunk holds an item.
    let target = inline.saturating_sub(CHUNK_SLACK.min(inline / 2)).max(1);
    debug_assert!(
        target < inline.max(2),
        "a chunk of the target size leaves room for its header in one packet"
    );
    target
}

/// Upper bound on items per chunk.
pub(crate) const MAX_CHUNK_ITEMS: usize = 1 << 24;

/// Picks chunk sizes: about [`TARGET_CHUNK_NANOS`] of work each, measured by the
/// workers, unless the caller fixed the size.
pub(crate) struct Sizer {
    pub(crate) fixed: Option<usize>,
    nanos: f64,
    items: f64,
}

impl Sizer {
    pub(crate) fn new(fixed: Option<usize>) -> Self {
        Self {
            fixed,
            nanos: 0.0,
            items: 0.0,
        }
    }

    pub(crate) fn next(&self, remaining: usize, workers: usize) -> usize {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        if self.items == 0.0 {
            // Nothing measured yet: one item tells the cost without risking a long chunk.
            return 1;
        }
        let per_item = (self.nanos / self.items).max(1.0);
        let mut size = (TARGET_CHUNK_NANOS / per_item) as usize;
        if remaining > 0 {
            // Near the end, smaller chunks keep every worker busy until the last one.
            size = size.min(remaining.div_ceil(2 * workers));
        }
        size.clamp(1, MAX_CHUNK_ITEMS)
    }

    /// Expected work for `items` items; zero before anything was measured.
    pub(crate) fn estimate_nanos(&self, items: usize) -> f64 {
        if self.items == 0.0 {
            0.0
        } else {
            self.nanos / self.items * items as f64
        }
    }

    pub(crate) fn observe(&mut self, nanos: u64, items: usize) {
        self.nanos += nanos as f64;
        self.items += items as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_chunk_is_one_item_then_about_a_millisecond() {
        let mut sizer = Sizer::new(None);
        assert_eq!(sizer.next(1_000_000, 2), 1);
        sizer.observe(10_000, 1); // 10 us per item
        assert_eq!(sizer.next(1_000_000, 2), 100);
        sizer.observe(990_000, 99);
        assert_eq!(sizer.next(1_000_000, 2), 100);
    }

    #[test]
    fn the_tail_is_split_across_workers() {
        let mut sizer = Sizer::new(None);
        sizer.observe(1_000, 1_000); // 1 ns per item: a million fit a millisecond
        assert_eq!(sizer.next(10_000_000, 2), 1_000_000);
        assert_eq!(sizer.next(1_000, 2), 250);
        assert_eq!(sizer.next(3, 2), 1);
    }

    #[test]
    fn the_byte_cap_leaves_room_in_one_packet() {
        // The default Linux buffer, a small one, a tiny one, and degenerate sizes.
        for inline in [212_438, 212_438 - 8192, 65_536, 16_384, 4_000, 100, 2, 1, 0] {
            let target = chunk_bytes_within(inline);
            assert!(target >= 1, "every chunk can hold an item");
            if inline >= 16_384 {
                assert!(target + 4096 <= inline, "{inline}: header and slack fit");
            }
            if inline >= 2 {
                assert!(
                    target < inline,
                    "{inline}: target {target} fills the packet"
                );
            }
        }
        assert_eq!(target_chunk_bytes(), chunk_bytes_within(inline_limit()));
        let _forced = crate::wire::transport::force_inline_limit(10_000);
        assert_eq!(target_chunk_bytes(), 5_000);
    }

    #[test]
    fn a_fixed_size_is_kept() {
        let mut sizer = Sizer::new(Some(7));
        sizer.observe(1, 1_000_000);
        assert_eq!(sizer.next(5, 4), 7);
    }
}
