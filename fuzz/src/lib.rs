//! What the fuzz targets share: reading an input's leading control bytes (where to cut the
//! rest into pieces) and feeding the pieces in order.
//!
//! Not a test framework: each target states its own properties. Targets that read bytes the
//! way a socket delivers them (heads, chunked bodies, SSE) take their cut points from the
//! front of the input, so that libFuzzer mutates where a read ends as freely as what it holds:
//!
//! ```text
//! [n] [c1] .. [ck] rest...     k = n % 8 cut points, each ci/255 of rest's length
//! ```
//!
//! Seeds for such targets start with these bytes (`\x02\x40\xc0`: cuts at 1/4 and 3/4).

/// Most cut points one input can ask for.
pub const MAX_CUTS: usize = 7;

/// Splits `data` into its cut points (sorted offsets into the rest, each within it) and the
/// rest. `None` when the control bytes are incomplete.
pub fn cuts(data: &[u8]) -> Option<(Vec<usize>, &[u8])> {
    let (&n, data) = data.split_first()?;
    let k = usize::from(n) % (MAX_CUTS + 1);
    if data.len() < k {
        return None;
    }
    let (fractions, rest) = data.split_at(k);
    let mut at: Vec<usize> = fractions.iter().map(|&f| rest.len() * usize::from(f) / 255).collect();
    at.sort_unstable();
    Some((at, rest))
}

/// The pieces `bytes` falls into when cut at `at` (sorted offsets; empty pieces included,
/// as a read of zero new bytes is a case too).
pub fn pieces<'a>(bytes: &'a [u8], at: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for &end in at {
        out.push(&bytes[start..end]);
        start = end;
    }
    out.push(&bytes[start..]);
    out
}
