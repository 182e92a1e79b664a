//! The on-disk format: segment names, the segment header, and checksummed records.
//!
//! Segment `<first seq, 20 digits>.log`: a 32-byte header, then records back to back.
//! Header: `magic "SSEGLOG\0" | version u32 | epoch u64 | first_seq u64 | crc32 u32` (the crc
//! covers the 28 bytes before it). Record: `len u32 | crc32 u32 | payload`, `len` the payload's
//! length and the crc its checksum; payload: `seq u64 | kind u8 | bytes`. Integers are
//! little-endian. The checksum makes a torn write (a record cut short, or whose pages only
//! partly reached the disk) detectable: recovery stops at the first record that fails it.

/// The first bytes of every segment.
const MAGIC: [u8; 8] = *b"SSEGLOG\0";
/// The format version; a segment of another version is refused, not guessed at.
pub(super) const VERSION: u32 = 1;
/// Bytes of the segment header.
pub(super) const HEADER_LEN: u64 = 32;
/// Bytes before a record's payload: `len`, `crc`.
pub(super) const RECORD_HEADER: usize = 8;
/// Bytes of a payload before the caller's bytes: `seq`, `kind`.
pub(super) const PAYLOAD_HEADER: usize = 9;
/// The largest payload a record may carry. Well above any event the service accepts; it also
/// bounds what recovery believes of a `len` read from disk.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// A segment's file name: its first sequence number, zero-padded so names sort as numbers.
pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The first sequence number a segment file name stands for, if it is one.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a valid header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub epoch: u64,
    pub first_seq: u64,
}

pub(super) fn encode_header(header: Header) -> [u8; HEADER_LEN as usize] {
    let mut out = [0u8; HEADER_LEN as usize];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&header.epoch.to_le_bytes());
    out[20..28].copy_from_slice(&header.first_seq.to_le_bytes());
    let crc = crc32fast::hash(&out[0..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Why a header is not valid. `Torn` is what a crash while writing it leaves (short, or a
/// checksum mismatch); `Foreign` is a whole header that is not ours to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BadHeader {
    Torn(&'static str),
    Foreign(String),
}

pub(super) fn decode_header(bytes: &[u8]) -> Result<Header, BadHeader> {
    let Some(head) = bytes.get(..HEADER_LEN as usize) else {
        return Err(BadHeader::Torn("header cut short"));
    };
    if le_u32(&head[28..32]) != crc32fast::hash(&head[0..28]) {
        return Err(BadHeader::Torn("header checksum mismatch"));
    }
    if head[0..8] != MAGIC {
        return Err(BadHeader::Foreign("not an ssegate log segment (bad magic)".into()));
    }
    let version = le_u32(&head[8..12]);
    if version != VERSION {
        return Err(BadHeader::Foreign(format!("segment format version {version}, this build reads {VERSION}")));
    }
    Ok(Header { epoch: le_u64(&head[12..20]), first_seq: le_u64(&head[20..28]) })
}

/// The checksum of a record's payload, computed before taking any lock.
pub(super) fn payload_crc(seq: u64, kind: u8, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&[kind]);
    hasher.update(bytes);
    hasher.finalize()
}

/// Appends one encoded record to `buf`. `bytes.len()` is at most `MAX_RECORD_BYTES` (checked
/// by the caller), so the length fits its `u32`.
pub(super) fn push_record(buf: &mut Vec<u8>, seq: u64, kind: u8, bytes: &[u8], crc: u32) {
    let len = (PAYLOAD_HEADER + bytes.len()) as u32;
    buf.reserve(RECORD_HEADER + len as usize);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(bytes);
}

/// The size (header included) and sequence number of the record at the start of `buf`, which
/// holds records this process encoded (`push_record`), so they are whole and well formed.
pub(super) fn peek_encoded(buf: &[u8]) -> Option<(usize, u64)> {
    let len = le_u32(buf.get(0..4)?) as usize;
    let seq = le_u64(buf.get(8..16)?);
    Some((RECORD_HEADER + len, seq))
}

/// One record read back from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordRef<'a> {
    pub seq: u64,
    pub kind: u8,
    pub bytes: &'a [u8],
}

/// What lies at the start of a segment's remaining bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next<'a> {
    /// A valid record, and its size on disk.
    Record(RecordRef<'a>, usize),
    /// Nothing: the segment ends here, exactly.
    End,
    /// A record that is cut short or fails its checksum.
    Bad(&'static str),
}

/// Reads the record at the start of `buf` (bytes from disk: nothing in them is trusted).
pub(super) fn read_record(buf: &[u8]) -> Next<'_> {
    if buf.is_empty() {
        return Next::End;
    }
    let Some(head) = buf.get(..RECORD_HEADER) else {
        return Next::Bad("record header cut short");
    };
    let len = le_u32(&head[0..4]) as usize;
    if !(PAYLOAD_HEADER..=PAYLOAD_HEADER + MAX_RECORD_BYTES).contains(&len) {
        return Next::Bad("impossible record length");
    }
    let Some(payload) = buf.get(RECORD_HEADER..RECORD_HEADER + len) else {
        return Next::Bad("record cut short");
    };
    if crc32fast::hash(payload) != le_u32(&head[4..8]) {
        return Next::Bad("record checksum mismatch");
    }
    let record = RecordRef { seq: le_u64(&payload[0..8]), kind: payload[8], bytes: &payload[PAYLOAD_HEADER..] };
    Next::Record(record, RECORD_HEADER + len)
}

/// Callers pass exactly 4 bytes; anything else reads as 0 rather than panicking.
fn le_u32(bytes: &[u8]) -> u32 {
    bytes.try_into().map(u32::from_le_bytes).unwrap_or(0)
}

fn le_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_as_numbers_and_parse_back() {
        assert_eq!(segment_name(42), "00000000000000000042.log");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_name("00000000000000000042.ckpt"), None);
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn a_record_round_trips_and_any_flipped_byte_is_caught() {
        let mut buf = Vec::new();
        push_record(&mut buf, 7, 3, b"hello", payload_crc(7, 3, b"hello"));
        let expected = RecordRef { seq: 7, kind: 3, bytes: b"hello" };
        assert_eq!(read_record(&buf), Next::Record(expected, buf.len()));
        assert_eq!(peek_encoded(&buf), Some((buf.len(), 7)));
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(matches!(read_record(&bad), Next::Bad(_)), "byte {i} flipped went unnoticed");
        }
        for cut in 1..buf.len() {
            assert!(matches!(read_record(&buf[..cut]), Next::Bad(_)), "cut at {cut} went unnoticed");
        }
    }

    #[test]
    fn a_header_round_trips_and_a_torn_one_is_told_from_a_foreign_one() {
        let header = Header { epoch: 0xfeed, first_seq: 9 };
        let bytes = encode_header(header);
        assert_eq!(decode_header(&bytes), Ok(header));
        assert!(matches!(decode_header(&bytes[..20]), Err(BadHeader::Torn(_))));
        let mut flipped = bytes;
        flipped[14] ^= 1;
        assert!(matches!(decode_header(&flipped), Err(BadHeader::Torn(_))));
        let mut other = bytes;
        other[8] = 2;
        let crc = crc32fast::hash(&other[0..28]);
        other[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode_header(&other), Err(BadHeader::Foreign(_))));
    }
}
