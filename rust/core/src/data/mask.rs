//! Loss masks from character spans: which tokens the loss looks at.

use std::ops::Range;

/// 1 for every token that overlaps one of `spans` (byte ranges, sorted and disjoint), else 0.
///
/// A token straddling a span edge counts as inside, as in transformers. Unlike transformers, a span whose
/// last character no token covers (whitespace a pre-tokenizer dropped, say) ends where it ends: transformers
/// then marks every token to the end of the sequence.
pub fn build_loss_mask(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    let mut span = 0usize;
    for (token, &(start, end)) in offsets.iter().enumerate() {
        while span < spans.len() && spans[span].end <= start {
            span += 1;
        }
        let Some(s) = spans.get(span) else { break };
        let overlaps =
            if start == end { s.start <= start && start < s.end } else { start < s.end && end > s.start };
        mask[token] = u8::from(overlaps);
    }
    mask
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a slice of one span is what the function takes
mod tests {
    use super::*;

    #[test]
    fn straddling_tokens_count_as_inside() {
        let offsets = [(0, 3), (3, 6), (6, 9), (9, 12)];
        assert_eq!(build_loss_mask(&offsets, &[4..7]), vec![0, 1, 1, 0]);
        assert_eq!(build_loss_mask(&offsets, &[0..3, 9..12]), vec![1, 0, 0, 1]);
    }

    #[test]
    fn a_span_ending_in_uncovered_text_stops_there() {
        // Tokens skip byte 5 (a dropped space); the span ends on it. Nothing after the span is marked.
        let offsets = [(0, 5), (6, 9), (9, 12)];
        assert_eq!(build_loss_mask(&offsets, &[0..6]), vec![1, 0, 0]);
    }
}
