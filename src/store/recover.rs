//! Recovery at open: read every segment in order, verify every record, and cut the last
//! segment at its first torn or bad record.
//!
//! Only the last segment can hold a torn tail: the writer fdatasyncs a segment before it starts
//! the next one. So a bad record anywhere else is corruption no crash of ours explains, and
//! open refuses it (`Corrupt`) instead of dropping acknowledged records silently (raft-engine's
//! default recovery mode draws the same line).

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{self, BadHeader, HEADER_LEN, Header, Next};
use super::{Record, StoreError};

/// What the segments hold.
pub(super) struct Scan {
    /// Every valid record, in sequence order.
    pub records: Vec<Record>,
    /// The first sequence number of every segment, oldest first.
    pub segments: VecDeque<u64>,
    /// The last segment (its first sequence number) and its valid length: appends go there.
    pub active: Option<(u64, u64)>,
    /// The sequence number every later append must be above.
    pub last_seq: u64,
    /// Bytes cut off the last segment's tail.
    pub cut_bytes: u64,
}

/// The first sequence numbers of the segments in `dir`, in order.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, e))?;
    let mut firsts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
        if let Some(first) = entry.file_name().to_str().and_then(format::parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

pub(super) fn scan(dir: &Path, epoch: u64) -> Result<Scan, StoreError> {
    let firsts = list_segments(dir)?;
    let mut scan = Scan {
        records: Vec::new(),
        segments: firsts.iter().copied().collect(),
        active: None,
        last_seq: 0,
        cut_bytes: 0,
    };
    for (i, &first) in firsts.iter().enumerate() {
        let last = i + 1 == firsts.len();
        let path = dir.join(format::segment_name(first));
        if first <= scan.last_seq {
            return Err(StoreError::corrupt(
                &path,
                0,
                format!("segment starts at {first}, not after {}", scan.last_seq),
            ));
        }
        let data = fs::read(&path).map_err(|e| StoreError::io("read", &path, e))?;
        let len = read_segment(&path, &data, Header { epoch, first_seq: first }, last, &mut scan)?;
        if last {
            scan.active = Some((first, len));
            scan.last_seq = scan.last_seq.max(first.saturating_sub(1));
        }
    }
    Ok(scan)
}

/// Reads one segment's records into `scan`; returns its valid length (after any cut).
fn read_segment(path: &Path, data: &[u8], expected: Header, last: bool, scan: &mut Scan) -> Result<u64, StoreError> {
    match format::decode_header(data) {
        Ok(header) if header == expected => {}
        Ok(header) => {
            let reason = format!(
                "header says epoch {:x}, first seq {}; expected epoch {:x} (META), first seq {} (file name)",
                header.epoch, header.first_seq, expected.epoch, expected.first_seq
            );
            return Err(StoreError::corrupt(path, 0, reason));
        }
        Err(BadHeader::Torn(reason)) if last => {
            // A crash while the segment was being created: none of it was acknowledged (the
            // header is synced with the first batch). Its name still tells where the sequence
            // stood, so the file is kept, with a fresh header.
            tracing::warn!(path = %path.display(), cut_bytes = data.len(), reason, "torn segment header: segment reset");
            reset(path, 0, Some(expected))?;
            scan.cut_bytes += data.len() as u64;
            return Ok(HEADER_LEN);
        }
        Err(BadHeader::Torn(reason)) => return Err(StoreError::corrupt(path, 0, reason)),
        Err(BadHeader::Foreign(reason)) => return Err(StoreError::corrupt(path, 0, reason)),
    }
    let mut offset = HEADER_LEN as usize;
    loop {
        let rest = data.get(offset..).unwrap_or_default();
        let reason = match format::read_record(rest) {
            Next::End => return Ok(offset as u64),
            Next::Record(record, size) if record.seq > scan.last_seq && record.seq >= expected.first_seq => {
                scan.records.push(Record { seq: record.seq, kind: record.kind, bytes: record.bytes.to_vec() });
                scan.last_seq = record.seq;
                offset += size;
                continue;
            }
            Next::Record(..) => "record sequence out of order",
            Next::Bad(reason) => reason,
        };
        if !last {
            return Err(StoreError::corrupt(path, offset as u64, reason));
        }
        let cut = (data.len() - offset) as u64;
        tracing::warn!(path = %path.display(), offset, cut_bytes = cut, reason, "torn tail cut off the log");
        reset(path, offset as u64, None)?;
        scan.cut_bytes += cut;
        return Ok(offset as u64);
    }
}

/// Cuts the file at `path` to `len` (rewriting its header first if given), durably.
fn reset(path: &Path, len: u64, header: Option<Header>) -> Result<(), StoreError> {
    let file = OpenOptions::new().write(true).open(path).map_err(|e| StoreError::io("open", path, e))?;
    file.set_len(len).map_err(|e| StoreError::io("truncate", path, e))?;
    if let Some(header) = header {
        file.write_all_at(&format::encode_header(header), 0).map_err(|e| StoreError::io("write", path, e))?;
    }
    file.sync_data().map_err(|e| StoreError::io("fdatasync", path, e))
}
