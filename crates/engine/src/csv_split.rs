//! Streaming CSV row scanning for [`crate::files::encrypt_paths`]: checks that every row has as many fields as
//! the first (reporting the line number of the first bad row) and splits a file into parts on
//! row boundaries. Quoted fields (RFC 4180, including embedded newlines and `""`) are handled.
//!
//! Hand-written rather than using a CSV parser because it never materialises fields: it only
//! counts separators outside quotes, which keeps encryption close to memory speed.

use std::fmt;

use memchr::memchr;

/// A CSV file that is not a table: a row whose field count differs from the first row's, or
/// a quoted field that never ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsvError {
    /// Row `line` has `found` fields where the first row has `expected`.
    FieldCount {
        /// The file.
        path: String,
        /// The row's first line (1-based).
        line: u64,
        /// Fields of the first row.
        expected: usize,
        /// Fields of this row.
        found: usize,
    },
    /// The file ends inside a quoted field.
    UnterminatedQuote {
        /// The file.
        path: String,
        /// The line where the unfinished row starts (`None` when rows were not checked, so
        /// lines were not counted).
        line: Option<u64>,
    },
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsvError::FieldCount {
                path,
                line,
                expected,
                found,
            } => write!(
                f,
                "{path}: line {line}: expected {expected} fields, found {found}"
            ),
            CsvError::UnterminatedQuote {
                path,
                line: Some(line),
            } => write!(
                f,
                "{path}: line {line}: a quoted field is not closed before the end of the file"
            ),
            CsvError::UnterminatedQuote { path, line: None } => write!(
                f,
                "{path}: a quoted field is not closed before the end of the file"
            ),
        }
    }
}

impl std::error::Error for CsvError {}

/// Scans a CSV file chunk by chunk: keeps its header, finds row boundaries at which to split
/// it, and (unless turned off) checks every row's field count.
///
/// Runs of bytes without quotes take a fast path: 64-byte blocks become bitmasks of commas,
/// line ends and quotes (with AVX2 where the CPU has it), and the rows in a block are checked
/// with a few bit operations. Blocks with a quote, blank lines and bad rows go byte by byte,
/// which is also where errors are reported from.
pub struct CsvScanner {
    path: String,
    check_rows: bool,
    expected: Option<usize>,
    separators: usize,
    in_quotes: bool,
    row_bytes: u64,
    line: u64,
    row_line: u64,
    keep_header: bool,
    header: Vec<u8>,
    header_done: bool,
    masks: BlockMasks,
}

impl CsvScanner {
    /// A scanner for the file `path`; with `has_header`, the first row is kept as the header.
    pub fn new(path: impl Into<String>, has_header: bool) -> Self {
        CsvScanner {
            path: path.into(),
            check_rows: true,
            expected: None,
            separators: 0,
            in_quotes: false,
            row_bytes: 0,
            line: 1,
            row_line: 1,
            keep_header: has_header,
            header: Vec::new(),
            header_done: !has_header,
            masks: BlockMasks::detect(),
        }
    }

    /// Turns the field-count check off: quote-free runs are then skipped over except where a
    /// row boundary is wanted, and lines are not counted.
    pub fn check_rows(mut self, check: bool) -> Self {
        self.check_rows = check;
        self
    }

    /// Uses the portable block masks even where the CPU has faster ones, so that tests cover
    /// both.
    fn portable(mut self) -> Self {
        self.masks = BlockMasks::Portable;
        self
    }

    /// The header row (with its line end), once it has been scanned.
    pub fn header(&self) -> Option<&[u8]> {
        (self.keep_header && self.header_done).then_some(&self.header[..])
    }

    /// Scans all of `chunk`.
    #[cfg(test)]
    pub fn scan(&mut self, chunk: &[u8]) -> Result<(), CsvError> {
        self.scan_until(chunk, usize::MAX).map(|_| ())
    }

    /// Scans `chunk` up to the end of the first row that ends at or after offset `min_end`
    /// (one past its `\n`) and returns that offset; the rest of the chunk is left for the next
    /// call. Returns `None` when the whole chunk was scanned without reaching such a row end.
    pub fn scan_until(&mut self, chunk: &[u8], min_end: usize) -> Result<Option<usize>, CsvError> {
        let len = chunk.len();
        let mut at = 0;
        while !self.header_done && at < len {
            let end = memchr(b'\n', &chunk[at..]).map_or(len, |nl| at + nl + 1);
            let stop = self.scalar(&chunk[at..end], at, min_end)?;
            self.header
                .extend_from_slice(&chunk[at..stop.unwrap_or(end)]);
            if stop.is_some() {
                return Ok(stop);
            }
            at = end;
        }
        while at < len {
            if self.in_quotes {
                // Inside a quoted field: byte by byte up to and including the next quote.
                let end = memchr(b'"', &chunk[at..]).map_or(len, |q| at + q + 1);
                if let Some(stop) = self.scalar(&chunk[at..end], at, min_end)? {
                    return Ok(Some(stop));
                }
                at = end;
                continue;
            }
            if self.check_rows {
                // Quote-free blocks by bitmasks, then the block that stopped them (a quote, a
                // blank line, a bad row or a wanted row end) byte by byte.
                at += self.checked_blocks(&chunk[at..], at, min_end);
                let end = len.min(at + 64);
                if let Some(stop) = self.scalar(&chunk[at..end], at, min_end)? {
                    return Ok(Some(stop));
                }
                at = end;
                continue;
            }
            let quote = memchr(b'"', &chunk[at..]).map_or(len, |q| at + q);
            if let Some(stop) = self.unquoted(&chunk[at..quote], at, min_end) {
                return Ok(Some(stop));
            }
            at = quote;
            if at < len {
                // The opening quote: the scalar path tracks the quote state.
                self.scalar(&chunk[at..at + 1], at, min_end)?;
                at += 1;
            }
        }
        Ok(None)
    }

    /// Skips over bytes that hold no quote, starting at offset `base` of the chunk, when rows
    /// are not checked: only a wanted row boundary matters, and without quotes that is a line
    /// end.
    fn unquoted(&mut self, bytes: &[u8], base: usize, min_end: usize) -> Option<usize> {
        let from = min_end.saturating_sub(1).saturating_sub(base);
        if let Some(nl) = bytes.get(from..).and_then(|rest| memchr(b'\n', rest)) {
            self.separators = 0;
            self.row_bytes = 0;
            return Some(base + from + nl + 1);
        }
        self.row_bytes += bytes.len() as u64;
        None
    }

    /// Checks whole 64-byte blocks of `bytes` (at offset `base` of the chunk) by bitmasks for
    /// as long as they hold no quote, no blank line and no bad row, and end before `min_end`.
    /// Returns how many bytes it checked; the block that stopped it is left for the
    /// byte-by-byte path.
    fn checked_blocks(&mut self, bytes: &[u8], base: usize, min_end: usize) -> usize {
        let Some(fields) = self.expected else {
            return 0;
        };
        // Blocks up to the one where a wanted row end may lie, which goes byte by byte to stop
        // exactly there.
        let whole = (min_end.saturating_sub(base).saturating_sub(1) / 64).min(bytes.len() / 64);
        let blocks = &bytes[..whole * 64];
        match self.masks {
            BlockMasks::Portable => self.block_run(blocks, fields, portable_masks),
            #[cfg(target_arch = "x86_64")]
            BlockMasks::Avx2(simd) => {
                // Compiled with AVX2, POPCNT and BMI enabled; `vectorize` runs it only on a
                // CPU that has them (the token proves it).
                simd.vectorize(
                    #[inline(always)]
                    || self.block_run(blocks, fields, |block| avx2_masks(simd, block)),
                )
            }
        }
    }

    /// The blocks of a quote-free run: stops at the first block with a quote or with a row
    /// that does not fit (a blank line or a bad row), with nothing of that block counted.
    #[inline(always)]
    fn block_run(
        &mut self,
        blocks: &[u8],
        fields: usize,
        masks: impl Fn(&[u8; 64]) -> Masks,
    ) -> usize {
        let commas_per_row = fields - 1;
        // Rows after the first line end of a block: few fields take a fixed number of steps
        // per block, which beats a step per row.
        let rest_fit = |commas: u64, line_ends: u64, first_row: u64| {
            if fields <= WALK_MAX_FIELDS {
                rows_fit_by_walking(commas, line_ends, commas_per_row)
            } else {
                rows_fit_one_by_one(commas & !first_row, line_ends & !first_row, commas_per_row)
            }
        };
        let (mut separators, mut row_bytes, mut lines) = (self.separators, self.row_bytes, 0);
        let mut checked = 0;
        for block in blocks.chunks_exact(64) {
            let block: &[u8; 64] = block.try_into().expect("64-byte block");
            let Masks {
                commas,
                line_ends,
                quotes,
            } = masks(block);
            if quotes != 0 {
                break;
            }
            // The row that ends at the first line end, or goes on past the block.
            let first_row = line_ends ^ line_ends.wrapping_sub(1);
            let in_first_row = separators + (commas & first_row).count_ones() as usize;
            if line_ends == 0 {
                separators = in_first_row;
                row_bytes += 64;
            } else {
                if in_first_row != commas_per_row || !rest_fit(commas, line_ends, first_row) {
                    break;
                }
                let after_last = !0u64 << (63 - line_ends.leading_zeros()) << 1;
                separators = (commas & after_last).count_ones() as usize;
                row_bytes = u64::from(line_ends.leading_zeros());
                lines += u64::from(line_ends.count_ones());
            }
            checked += 64;
        }
        self.separators = separators;
        self.row_bytes = row_bytes;
        if lines > 0 {
            self.line += lines;
            self.row_line = self.line;
        }
        checked
    }

    fn scalar(
        &mut self,
        bytes: &[u8],
        base: usize,
        min_end: usize,
    ) -> Result<Option<usize>, CsvError> {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' => {
                    self.line += 1;
                    if self.in_quotes {
                        // A quoted field spans the line end; the row goes on.
                        self.row_bytes += 1;
                        continue;
                    }
                    self.end_row()?;
                    if base + i + 1 >= min_end {
                        return Ok(Some(base + i + 1));
                    }
                    continue;
                }
                b'"' => self.in_quotes = !self.in_quotes,
                b',' if !self.in_quotes => self.separators += 1,
                _ => {}
            }
            self.row_bytes += 1;
        }
        Ok(None)
    }

    fn end_row(&mut self) -> Result<(), CsvError> {
        if self.row_bytes > 0 {
            let fields = self.separators + 1;
            match self.expected {
                None => self.expected = Some(fields),
                Some(expected) if expected != fields && self.check_rows => {
                    return Err(CsvError::FieldCount {
                        path: self.path.clone(),
                        line: self.row_line,
                        expected,
                        found: fields,
                    });
                }
                Some(_) => {}
            }
            self.header_done = true;
        }
        self.separators = 0;
        self.row_bytes = 0;
        self.row_line = self.line;
        Ok(())
    }

    /// Checks the last row when the input ends without a final line end.
    pub fn finish(&mut self) -> Result<(), CsvError> {
        if self.in_quotes {
            return Err(CsvError::UnterminatedQuote {
                path: self.path.clone(),
                line: self.check_rows.then_some(self.row_line),
            });
        }
        if self.row_bytes > 0 {
            if !self.header_done {
                self.header.push(b'\n');
            }
            self.end_row()?;
        }
        Ok(())
    }
}

/// Up to this many fields, rows are checked by [`rows_fit_by_walking`].
const WALK_MAX_FIELDS: usize = 8;

/// Whether every row that starts after a line end of the block and ends in it has exactly
/// `commas_per_row` commas (the row ending at the first line end was checked already).
///
/// A step moves every marked separator to the next separator, all at once, with one addition:
/// the marks are added to a mask of everything but the unmarked separators, so each carry runs
/// up to the next unmarked separator (a run of marked separators shifts up by one). Starting
/// from the line ends, `commas_per_row + 1` steps must end exactly on the line ends after the
/// first one. Steps preserve order and a walk that passes the block's end drops out, so the
/// walk from the last line end is the one that drops out and every other line end's walk
/// ends on the next line end: the row in between has `commas_per_row` separators before its
/// line end, all commas.
#[inline(always)]
fn rows_fit_by_walking(commas: u64, line_ends: u64, commas_per_row: usize) -> bool {
    let separators = commas | line_ends;
    let step = |at: u64| (!separators | at).wrapping_add(at) & separators;
    let at = (0..=commas_per_row).fold(line_ends, |at, _| step(at));
    at == line_ends & line_ends.wrapping_sub(1)
}

/// Whether every row that ends at one of `line_ends` (with no earlier row in `commas`) has
/// exactly `commas_per_row` commas: one popcount per row.
#[inline(always)]
fn rows_fit_one_by_one(commas: u64, line_ends: u64, commas_per_row: usize) -> bool {
    let mut rest = commas;
    let mut ends = line_ends;
    while ends != 0 {
        // Bits up to and including the lowest line end.
        let through = ends ^ (ends - 1);
        if (rest & through).count_ones() as usize != commas_per_row {
            return false;
        }
        rest &= !through;
        ends &= ends - 1;
    }
    true
}

/// Bitmasks of one 64-byte block: bit i is set when byte i is a comma, a line end, a quote.
struct Masks {
    commas: u64,
    line_ends: u64,
    quotes: u64,
}

/// How blocks become bitmasks on this CPU.
#[derive(Clone, Copy)]
enum BlockMasks {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 compares and `vpmovmskb`. The token exists only when the CPU has AVX2, POPCNT
    /// and BMI1/2 (x86-64-v3), checked at run time; `pulp` keeps the `unsafe` of calling
    /// target-feature code out of this crate.
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
}

impl BlockMasks {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return BlockMasks::Avx2(simd);
        }
        BlockMasks::Portable
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx2_masks(simd: pulp::x86::V3, block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::__m256i;
    let (low, high) = block.split_at(32);
    let low: __m256i = pulp::cast(<[u8; 32]>::try_from(low).expect("32 bytes"));
    let high: __m256i = pulp::cast(<[u8; 32]>::try_from(high).expect("32 bytes"));
    let mask = |byte: u8| {
        let byte = simd.avx._mm256_set1_epi8(byte as i8);
        let bits = |half| {
            let equal = simd.avx2._mm256_cmpeq_epi8(half, byte);
            u64::from(simd.avx2._mm256_movemask_epi8(equal) as u32)
        };
        bits(low) | bits(high) << 32
    };
    Masks {
        commas: mask(b','),
        line_ends: mask(b'\n'),
        quotes: mask(b'"'),
    }
}

/// The byte comparisons vectorise; each group of eight 0/1 bytes is gathered into eight
/// bits by one multiplication.
#[inline(always)]
fn portable_masks(block: &[u8; 64]) -> Masks {
    let mut commas = [0u8; 64];
    let mut line_ends = [0u8; 64];
    let mut quotes = [0u8; 64];
    for i in 0..64 {
        commas[i] = u8::from(block[i] == b',');
        line_ends[i] = u8::from(block[i] == b'\n');
        quotes[i] = u8::from(block[i] == b'"');
    }
    let gather = |bytes: &[u8; 64]| {
        (0..8).fold(0u64, |bits, w| {
            bits | gather_bits(&bytes[w * 8..w * 8 + 8]) << (8 * w)
        })
    };
    Masks {
        commas: gather(&commas),
        line_ends: gather(&line_ends),
        quotes: gather(&quotes),
    }
}

/// Eight bytes that are each 0 or 1, as an 8-bit mask (bit k = byte k).
#[inline(always)]
fn gather_bits(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes")).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

/// The scanner held against its byte-by-byte definition, for the property test below and the
/// `csv_rows` fuzz target (`fuzz/`), which must exercise the same check.
#[doc(hidden)]
pub mod differential {
    use super::{CsvError, CsvScanner};

    /// Which block masks the scanner uses.
    #[derive(Clone, Copy, Debug)]
    pub enum Masks {
        /// The plain-Rust masks, whatever the CPU.
        Portable,
        /// What the CPU offers (AVX2 on x86-64-v3), as `ppml encrypt` runs.
        Detected,
    }

    /// What the byte-by-byte definition finds in a whole input.
    struct Reference {
        /// Every row end outside quotes (blank lines included), up to the first error.
        ends: Vec<usize>,
        /// The first error.
        error: Option<CsvError>,
        /// The header row, with its line end, once complete.
        header: Option<Vec<u8>>,
    }

    /// The definition the scanner must match: byte by byte, with a header row.
    fn reference(data: &[u8], check: bool) -> Reference {
        let (mut ends, mut expected, mut header) = (Vec::new(), None, None);
        let (mut quoted, mut separators, mut row_bytes) = (false, 0, 0);
        let (mut line, mut row_line) = (1u64, 1u64);
        for (i, &b) in data.iter().enumerate() {
            match b {
                b'\n' if !quoted => {
                    line += 1;
                    if row_bytes > 0 {
                        match expected {
                            None => {
                                expected = Some(separators + 1);
                                header = Some(data[..=i].to_vec());
                            }
                            Some(e) if check && e != separators + 1 => {
                                let error = CsvError::FieldCount {
                                    path: "t.csv".into(),
                                    line: row_line,
                                    expected: e,
                                    found: separators + 1,
                                };
                                return Reference {
                                    ends,
                                    error: Some(error),
                                    header,
                                };
                            }
                            Some(_) => {}
                        }
                    }
                    ends.push(i + 1);
                    (separators, row_bytes, row_line) = (0, 0, line);
                    continue;
                }
                b'\n' => line += 1,
                b'"' => quoted = !quoted,
                b',' if !quoted => separators += 1,
                _ => {}
            }
            row_bytes += 1;
        }
        let error = if quoted {
            Some(CsvError::UnterminatedQuote {
                path: "t.csv".into(),
                line: check.then_some(row_line),
            })
        } else if check && row_bytes > 0 && expected.is_some_and(|e| e != separators + 1) {
            Some(CsvError::FieldCount {
                path: "t.csv".into(),
                line: row_line,
                expected: expected.unwrap_or(0),
                found: separators + 1,
            })
        } else {
            None
        };
        if error.is_none() && header.is_none() && row_bytes > 0 {
            header = Some([data, b"\n"].concat());
        }
        Reference {
            ends,
            error,
            header,
        }
    }

    /// Scans `data` in chunks of `chunk` bytes, asking for the first row end at or past each
    /// of the offsets `wants`, and compares the row ends found, the first error and the header
    /// with the byte-by-byte definition: `Err` describes the first difference.
    pub fn check(
        data: &[u8],
        chunk: usize,
        wants: &[usize],
        check_rows: bool,
        masks: Masks,
    ) -> Result<(), String> {
        let reference = reference(data, check_rows);
        let mut wants = wants.to_vec();
        wants.sort_unstable();
        let mut scanner = CsvScanner::new("t.csv", true).check_rows(check_rows);
        if let Masks::Portable = masks {
            scanner = scanner.portable();
        }
        let (mut found, mut next_want, mut base) = (Vec::new(), 0, 0);
        let result = (|| {
            for piece in data.chunks(chunk.max(1)) {
                let mut from = 0;
                loop {
                    let want = wants.get(next_want).copied().unwrap_or(usize::MAX);
                    let min_end = want.saturating_sub(base + from);
                    match scanner.scan_until(&piece[from..], min_end)? {
                        Some(end) => {
                            found.push(base + from + end);
                            from += end;
                            next_want += 1;
                        }
                        None => break,
                    }
                }
                base += piece.len();
            }
            scanner.finish()
        })();
        if result.as_ref().err() != reference.error.as_ref() {
            return Err(format!(
                "{masks:?} masks: error {:?}, the definition's {:?}",
                result.err(),
                reference.error
            ));
        }
        let mut expected = Vec::new();
        let mut last = 0;
        for &want in &wants {
            match reference.ends.iter().find(|&&e| e >= want && e > last) {
                Some(&e) => {
                    expected.push(e);
                    last = e;
                }
                None => break,
            }
        }
        if reference.error.is_some() {
            // Scanning stopped at the error: only the row ends found before it count.
            expected.truncate(found.len());
        }
        if found != expected {
            return Err(format!(
                "{masks:?} masks: row ends {found:?} for offsets {wants:?}, the definition's \
                 {expected:?}"
            ));
        }
        if reference.error.is_none() && scanner.header() != reference.header.as_deref() {
            return Err(format!(
                "{masks:?} masks: header {:?}, the definition's {:?}",
                scanner.header().map(String::from_utf8_lossy),
                reference.header.as_deref().map(String::from_utf8_lossy)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::differential::{self, Masks as MaskKind};
    use super::*;

    /// Every row end, found by asking for the next one each time.
    fn scan_all(data: &[u8], chunk: usize) -> Result<Vec<usize>, CsvError> {
        let mut scanner = CsvScanner::new("t.csv", true);
        let mut ends = Vec::new();
        let mut base = 0;
        for piece in data.chunks(chunk) {
            let mut from = 0;
            while let Some(end) = scanner.scan_until(&piece[from..], 0)? {
                ends.push(base + from + end);
                from += end;
            }
            base += piece.len();
        }
        scanner.finish()?;
        Ok(ends)
    }

    fn field_count_error(err: &CsvError) -> (u64, usize, usize) {
        match err {
            CsvError::FieldCount {
                line,
                expected,
                found,
                ..
            } => (*line, *expected, *found),
            other => panic!("not a field count error: {other}"),
        }
    }

    #[test]
    fn finds_row_ends_across_chunk_boundaries() {
        let data = b"a,b,c\n1,2,3\n4,5,6\n";
        for chunk in 1..data.len() {
            assert_eq!(scan_all(data, chunk).unwrap(), vec![6, 12, 18]);
        }
    }

    #[test]
    fn reports_the_line_of_a_bad_row() {
        let data = b"a,b,c\n1,2,3\n4,5\n";
        let err = scan_all(data, 4).unwrap_err();
        assert_eq!(field_count_error(&err), (3, 3, 2));
        assert_eq!(err.to_string(), "t.csv: line 3: expected 3 fields, found 2");
        let err = scan_all(b"a,b\n1,2\n3,4,5", 64).unwrap_err();
        assert_eq!(field_count_error(&err), (3, 2, 3));
    }

    #[test]
    fn quoted_fields_may_hold_separators_and_newlines() {
        let data = b"a,b\n\"x,y\",\"line\nbreak\"\n\"q\"\"uote\",2\n";
        for chunk in 1..data.len() {
            assert_eq!(scan_all(data, chunk).unwrap().len(), 3, "chunk {chunk}");
        }
        let err = scan_all(b"a,b\n\"x,y\",1\n\"x,y\"\n", 64).unwrap_err();
        assert_eq!(field_count_error(&err).0, 3);
        let err = scan_all(b"a,b\n1,2\n\"open,3\n", 64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.csv: line 3: a quoted field is not closed before the end of the file"
        );
    }

    #[test]
    fn byte_masks_are_exact() {
        let mut block = [b'a'; 64];
        for i in [0, 7, 8, 31, 32, 33, 63] {
            block[i] = b',';
        }
        block[1] = 0x80 | b',';
        block[2] = b'\n';
        block[40] = b'"';
        let check = |masks: Masks| {
            assert_eq!(
                masks.commas,
                (1 << 0) | (1 << 7) | (1 << 8) | (1 << 31) | (1 << 32) | (1 << 33) | (1 << 63)
            );
            assert_eq!(masks.line_ends, 1 << 2);
            assert_eq!(masks.quotes, 1 << 40);
        };
        check(portable_masks(&block));
        #[cfg(target_arch = "x86_64")]
        if let BlockMasks::Avx2(simd) = BlockMasks::detect() {
            check(simd.vectorize(|| avx2_masks(simd, &block)));
        }
    }

    #[test]
    fn fast_and_slow_paths_agree_on_long_input() {
        let mut data = b"name,age,job\n".to_vec();
        for i in 0..2000 {
            if i % 97 == 0 {
                data.extend_from_slice(format!("\"q,{i}\",{i},\"x\ny\"\n").as_bytes());
            } else {
                data.extend_from_slice(format!("n{i},{},Developer\n", i % 60).as_bytes());
            }
        }
        let expected: usize = 2001;
        for chunk in [1, 7, 64, 100, 4096] {
            assert_eq!(
                scan_all(&data, chunk).unwrap().len(),
                expected,
                "chunk {chunk}"
            );
        }
        let mut bad = data.clone();
        let at = bad.len() - 5;
        bad.insert(at, b',');
        for portable in [false, true] {
            let mut scanner = CsvScanner::new("t.csv", true);
            if portable {
                scanner = scanner.portable();
            }
            data.chunks(4096)
                .try_for_each(|piece| scanner.scan(piece))
                .unwrap();
            scanner.finish().unwrap();
            assert_eq!(
                scanner.line,
                2001 + 2000 / 97 + 1 + 1,
                "portable {portable}"
            );
            let mut scanner = CsvScanner::new("t.csv", true);
            if portable {
                scanner = scanner.portable();
            }
            let err = bad
                .chunks(4096)
                .try_for_each(|piece| scanner.scan(piece))
                .unwrap_err();
            assert_eq!(field_count_error(&err), (2001 + 2000 / 97 + 1, 3, 4));
        }
    }

    /// Exhaustively over every sequence of 10 bytes drawn from {data, comma, line end}, at
    /// the bottom and at the top of a block: walking accepts exactly the blocks whose rows
    /// between line ends have the expected commas, except that it may also turn down a block
    /// whose unfinished last row already has too many (that row fails at its line end).
    #[test]
    fn walking_agrees_with_counting_on_every_short_block() {
        for commas_per_row in 0..=4 {
            for shift in [0, 54] {
                for code in 0..3u32.pow(10) {
                    let (mut commas, mut line_ends, mut code) = (0u64, 0u64, code);
                    for bit in 0..10 {
                        match code % 3 {
                            1 => commas |= 1 << (bit + shift),
                            2 => line_ends |= 1 << (bit + shift),
                            _ => {}
                        }
                        code /= 3;
                    }
                    let counted = rows_fit_one_by_one(
                        commas & !(line_ends ^ line_ends.wrapping_sub(1)),
                        line_ends & line_ends.wrapping_sub(1),
                        commas_per_row,
                    );
                    let walked = rows_fit_by_walking(commas, line_ends, commas_per_row);
                    let after_last = match line_ends {
                        0 => !0,
                        _ => !0u64 << (63 - line_ends.leading_zeros()) << 1,
                    };
                    let long_last_row =
                        (commas & after_last).count_ones() as usize > commas_per_row;
                    assert!(
                        walked == counted || (counted && long_last_row),
                        "{commas_per_row} commas per row, commas {commas:#b}, line ends \
                         {line_ends:#b}: walked {walked}, counted {counted}"
                    );
                }
            }
        }
    }

    #[test]
    fn keeps_the_header_and_skips_blank_lines() {
        let mut scanner = CsvScanner::new("t.csv", true);
        scanner.scan(b"name,age\nbob,3\n\nann,4\n").unwrap();
        assert_eq!(scanner.header(), Some(&b"name,age\n"[..]));
    }

    #[test]
    fn unchecked_rows_still_split_on_row_boundaries() {
        let data = b"a,b\n1,2,3\n\"x\ny\",2\n4\n";
        let mut scanner = CsvScanner::new("t.csv", true).check_rows(false);
        assert_eq!(scanner.scan_until(data, 11).unwrap(), Some(18));
        assert_eq!(scanner.header(), Some(&b"a,b\n"[..]));
        assert_eq!(scanner.scan_until(&data[18..], 0).unwrap(), Some(2));
        scanner.finish().unwrap();
        let mut scanner = CsvScanner::new("t.csv", false).check_rows(false);
        scanner.scan(b"1,\"2\n").unwrap();
        assert_eq!(
            scanner.finish().unwrap_err().to_string(),
            "t.csv: a quoted field is not closed before the end of the file"
        );
    }

    /// CSV-like bytes with a header of 1 to 12 fields: mostly well-formed rows, with random
    /// quotes, blank lines, missing or extra commas.
    fn csv_like() -> impl Strategy<Value = Vec<u8>> {
        (1usize..=12).prop_flat_map(|fields| {
            let good = |fields: usize| {
                prop::collection::vec("[a-z0-9]{0,6}", fields).prop_map(|row| row.join(","))
            };
            let row = prop_oneof![
                40 => good(fields),
                2 => Just(String::new()),
                2 => good(fields).prop_map(|row| format!("\"q,\n\"\"x\",{row}")),
                1 => good(fields.saturating_sub(1).max(1)),
                1 => good(fields + 1),
                1 => Just("\"".to_string()),
                1 => good(fields).prop_map(|row| format!("{row},")),
                1 => good(fields).prop_map(|row| format!("{row}\r")),
            ];
            prop::collection::vec(row, 0..300).prop_map(move |rows| {
                let header = (0..fields).map(|i| format!("h{i}")).collect::<Vec<_>>();
                let mut data = format!("{}\n", header.join(",")).into_bytes();
                for row in rows {
                    data.extend_from_slice(row.as_bytes());
                    data.push(b'\n');
                }
                data
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Asked for row ends at arbitrary offsets, over arbitrary chunks, the scanner finds
        /// exactly the first row end at or past each offset, and the same first error, as
        /// the byte-by-byte definition.
        #[test]
        fn matches_the_byte_by_byte_definition(
            data in csv_like(),
            chunk in prop_oneof![1usize..300, 300usize..5000],
            wants in prop::collection::vec(0usize..8000, 0..8),
            check in any::<bool>(),
            portable in any::<bool>(),
        ) {
            let masks = if portable { MaskKind::Portable } else { MaskKind::Detected };
            if let Err(mismatch) = differential::check(&data, chunk, &wants, check, masks) {
                return Err(TestCaseError::fail(mismatch));
            }
        }
    }
}
