//! Packing documents into fixed-length rows: best-fit-decreasing.

use std::collections::BTreeSet;

/// Assign documents of `lengths` (each at most `capacity`) to rows of `capacity` tokens, best-fit-decreasing:
/// longest first, each into the fullest row that still has room, a new row when none has. Deterministic: ties
/// in length keep document order, ties in room go to the older row. Returns rows as lists of document
/// indices, rows in creation order, documents in placement order. O(n log n).
pub fn best_fit_decreasing(lengths: &[u32], capacity: u32) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    order.sort_by(|&a, &b| lengths[b as usize].cmp(&lengths[a as usize]).then(a.cmp(&b)));
    let mut rows: Vec<Vec<u32>> = vec![];
    // (room left, row index) of every row that still has room.
    let mut open: BTreeSet<(u32, u32)> = BTreeSet::new();
    for doc in order {
        let len = lengths[doc as usize].min(capacity);
        let fit = open.range((len, 0)..).next().copied();
        let (room, row) = match fit {
            Some(slot) => {
                open.remove(&slot);
                slot
            }
            None => {
                rows.push(vec![]);
                (capacity, rows.len() as u32 - 1)
            }
        };
        rows[row as usize].push(doc);
        if room - len > 0 {
            open.insert((room - len, row));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_rows_best_fit_decreasing() {
        let rows = best_fit_decreasing(&[5, 3, 8, 2, 2], 10);
        assert_eq!(rows, vec![vec![2, 3], vec![0, 1, 4]]);
    }

    #[test]
    fn every_document_lands_once_and_rows_never_overflow() {
        let lengths: Vec<u32> = (0..500u32).map(|i| (i * 7919) % 97 + 1).collect();
        let rows = best_fit_decreasing(&lengths, 128);
        let mut seen: Vec<u32> = rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        for row in &rows {
            assert!(row.iter().map(|&d| lengths[d as usize]).sum::<u32>() <= 128);
        }
        let total: u32 = lengths.iter().sum();
        assert!(rows.len() as u32 <= total / 128 + 2, "{} rows for {} tokens", rows.len(), total);
    }
}
