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
    pub fn scan(&mut self, chunk: &[u8], mut row_end: impl FnMut(usize)) -> Result<(), CsvError> {
        let mut at = 0;
        while at < chunk.len() {
            let rest = &chunk[at..];
            let (line, complete) = match memchr(b'\n', rest) {
                Some(nl) => (&rest[..nl], true),
                None => (rest, false),
            };
            if !self.header_done {
                self.header.extend_from_slice(line);
                if complete {
                    self.header.push(b'\n');
                }
            }
            if !self.in_quotes && memchr(b'"', line).is_none() {
                self.separators += line.iter().filter(|&&b| b == b',').count();
            } else {
                for &b in line {
                    match b {
                        b'"' => self.in_quotes = !self.in_quotes,
                        b',' if !self.in_quotes => self.separators += 1,
                        _ => {}
                    }
                }
            }
            self.row_bytes += line.len() as u64;
            at += line.len();
            if !complete {
                break;
            }
            at += 1;
            self.line += 1;
            if self.in_quotes {
                // A quoted field spans the line end; the row goes on.
                self.row_bytes += 1;
                continue;
            }
            self.end_row()?;
            row_end(at);
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
    fn keeps_the_header_and_skips_blank_lines() {
        let mut scanner = CsvScanner::new("t.csv", true);
        scanner.scan(b"name,age\nbob,3\n\nann,4\n", |_| {}).unwrap();
        assert_eq!(scanner.header(), Some(&b"name,age\n"[..]));
    }
}
