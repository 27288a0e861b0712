//! Streaming CSV row scanning for `ppml encrypt`: checks that every row has as many fields as
//! the first (reporting the line number of the first bad row) and splits a file into parts on
//! row boundaries. Quoted fields (RFC 4180, including embedded newlines and `""`) are handled.
//!
//! Hand-written rather than using a CSV parser because it never materialises fields: it only
//! counts separators outside quotes, which keeps encryption close to memory speed.

use std::fmt;

use memchr::memchr;

/// A row whose field count differs from the first row's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvError {
    pub path: String,
    pub line: u64,
    pub expected: usize,
    pub found: usize,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: line {}: expected {} fields, found {}",
            self.path, self.line, self.expected, self.found
        )
    }
}

impl std::error::Error for CsvError {}

/// What the scanner reports about a chunk: byte offsets (within the chunk) at which a row
/// ends, one past its `\n`.
pub struct CsvScanner {
    path: String,
    expected: Option<usize>,
    separators: usize,
    in_quotes: bool,
    row_bytes: u64,
    line: u64,
    row_line: u64,
    keep_header: bool,
    header: Vec<u8>,
    header_done: bool,
}

impl CsvScanner {
    /// A scanner for the file `path`; with `has_header`, the first row is kept as the header.
    pub fn new(path: impl Into<String>, has_header: bool) -> Self {
        CsvScanner {
            path: path.into(),
            expected: None,
            separators: 0,
            in_quotes: false,
            row_bytes: 0,
            line: 1,
            row_line: 1,
            keep_header: has_header,
            header: Vec::new(),
            header_done: !has_header,
        }
    }

    /// The header row (with its line end), once it has been scanned.
    pub fn header(&self) -> Option<&[u8]> {
        (self.keep_header && self.header_done).then_some(&self.header[..])
    }

    /// Scans `chunk`, calling `row_end(offset)` after each complete row.
    ///
    /// Blocks of 64 bytes without quotes take a fast path: bitmasks of separators and line
    /// ends (which the compiler vectorises) and a popcount per row; anything else goes byte
    /// by byte.
    pub fn scan(&mut self, chunk: &[u8], mut row_end: impl FnMut(usize)) -> Result<(), CsvError> {
        let mut at = 0;
        while !self.header_done && at < chunk.len() {
            let end = memchr(b'\n', &chunk[at..]).map_or(chunk.len(), |nl| at + nl + 1);
            self.header.extend_from_slice(&chunk[at..end]);
            self.scalar(&chunk[at..end], at, &mut row_end)?;
            at = end;
        }
        let mut blocks = chunk[at..].chunks_exact(64);
        for block in &mut blocks {
            let block: &[u8; 64] = block.try_into().expect("64-byte block");
            let (separators, line_ends, quotes) = block_masks(block);
            if self.in_quotes || quotes != 0 {
                self.scalar(block, at, &mut row_end)?;
            } else {
                self.fast_block(separators, line_ends, at, &mut row_end)?;
            }
            at += 64;
        }
        let rest = blocks.remainder();
        self.scalar(rest, at, &mut row_end)
    }

    fn fast_block(
        &mut self,
        separators: u64,
        mut line_ends: u64,
        base: usize,
        row_end: &mut impl FnMut(usize),
    ) -> Result<(), CsvError> {
        let mut from = 0u32;
        while line_ends != 0 {
            let pos = line_ends.trailing_zeros();
            let in_row = separators & (low_bits(pos) & !low_bits(from));
            self.separators += in_row.count_ones() as usize;
            self.row_bytes += u64::from(pos - from);
            self.line += 1;
            self.end_row()?;
            row_end(base + pos as usize + 1);
            from = pos + 1;
            line_ends &= line_ends - 1;
        }
        self.separators += (separators & !low_bits(from)).count_ones() as usize;
        self.row_bytes += u64::from(64 - from);
        Ok(())
    }

    fn scalar(
        &mut self,
        bytes: &[u8],
        base: usize,
        row_end: &mut impl FnMut(usize),
    ) -> Result<(), CsvError> {
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
                    row_end(base + i + 1);
                    continue;
                }
                b'"' => self.in_quotes = !self.in_quotes,
                b',' if !self.in_quotes => self.separators += 1,
                _ => {}
            }
            self.row_bytes += 1;
        }
        Ok(())
    }

    fn end_row(&mut self) -> Result<(), CsvError> {
        if self.row_bytes > 0 {
            let fields = self.separators + 1;
            match self.expected {
                None => self.expected = Some(fields),
                Some(expected) if expected != fields => {
                    return Err(CsvError {
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
            return Err(CsvError {
                path: self.path.clone(),
                line: self.row_line,
                expected: self.expected.unwrap_or(0),
                found: self.separators + 1,
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

/// Bits set below `n` (n <= 64).
fn low_bits(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Bitmasks of `,`, `\n` and `"` in a 64-byte block (bit i = byte i), eight bytes at a time
/// with SWAR arithmetic (no `unsafe` SIMD intrinsics needed).
fn block_masks(block: &[u8; 64]) -> (u64, u64, u64) {
    let (mut separators, mut line_ends, mut quotes) = (0u64, 0u64, 0u64);
    for (w, word) in block.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let shift = 8 * w as u32;
        separators |= byte_eq_mask(word, b',') << shift;
        line_ends |= byte_eq_mask(word, b'\n') << shift;
        quotes |= byte_eq_mask(word, b'"') << shift;
    }
    (separators, line_ends, quotes)
}

/// An 8-bit mask of the bytes of `word` equal to `byte` (bit k = byte k, little endian).
fn byte_eq_mask(word: u64, byte: u8) -> u64 {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let t = word ^ (u64::from(byte) * 0x0101_0101_0101_0101);
    // 0x80 exactly in the bytes where t is zero (no carries cross bytes).
    let zero = !(((t & LOW7) + LOW7) | t | LOW7);
    // Gather bit 7 of each byte into the top byte.
    (zero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(data: &[u8], chunk: usize) -> Result<Vec<usize>, CsvError> {
        let mut scanner = CsvScanner::new("t.csv", true);
        let mut ends = Vec::new();
        let mut base = 0;
        for piece in data.chunks(chunk) {
            scanner.scan(piece, |at| ends.push(base + at))?;
            base += piece.len();
        }
        scanner.finish()?;
        Ok(ends)
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
        assert_eq!((err.line, err.expected, err.found), (3, 3, 2));
        assert_eq!(err.to_string(), "t.csv: line 3: expected 3 fields, found 2");
        let err = scan_all(b"a,b\n1,2\n3,4,5", 64).unwrap_err();
        assert_eq!((err.line, err.found), (3, 3));
    }

    #[test]
    fn quoted_fields_may_hold_separators_and_newlines() {
        let data = b"a,b\n\"x,y\",\"line\nbreak\"\n\"q\"\"uote\",2\n";
        for chunk in 1..data.len() {
            assert_eq!(scan_all(data, chunk).unwrap().len(), 3, "chunk {chunk}");
        }
        let err = scan_all(b"a,b\n\"x,y\",1\n\"x,y\"\n", 64).unwrap_err();
        assert_eq!(err.line, 3);
    }

    #[test]
    fn byte_masks_are_exact() {
        let mut block = [b'a'; 64];
        for i in [0, 7, 8, 33, 63] {
            block[i] = b',';
        }
        block[1] = 0x80 | b',';
        block[2] = b'\n';
        let (sep, nl, q) = block_masks(&block);
        assert_eq!(sep, (1 << 0) | (1 << 7) | (1 << 8) | (1 << 33) | (1 << 63));
        assert_eq!(nl, 1 << 2);
        assert_eq!(q, 0);
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
        let err = scan_all(&bad, 4096).unwrap_err();
        assert_eq!((err.line, err.found), (2001 + 2000 / 97 + 1, 4));
    }

    #[test]
    fn keeps_the_header_and_skips_blank_lines() {
        let mut scanner = CsvScanner::new("t.csv", true);
        scanner.scan(b"name,age\nbob,3\n\nann,4\n", |_| {}).unwrap();
        assert_eq!(scanner.header(), Some(&b"name,age\n"[..]));
    }
}
