//! Where a runner is in the executable: the code ranges read from
//! `/proc/self/maps`, offsets taken from an anchor function, and the hashes that
//! check a task reference and its types.

use std::any::type_name;
use std::ops::Range;
use std::sync::OnceLock;

/// Where the program's executable code is mapped in this process.
///
/// Offsets are taken from [`anchor`], a function of this crate, rather than from a
/// load base: the code ranges say whether an address belongs to the executable, and
/// both the anchor and every runner must, so a crate built as a dynamic library (where
/// the distance between them changes from process to process) is refused.
pub(super) struct Image {
    /// The executable's mappings with execute permission.
    code: Vec<Range<usize>>,
}

/// The reference point for task offsets. Never inlined, so it has an address.
#[inline(never)]
pub(super) fn anchor() {}

impl Image {
    /// The executable's code ranges in this process, read from `/proc/self/maps` on
    /// first success and kept (a failed read is tried again next time).
    pub(super) fn get() -> Option<&'static Image> {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        if let Some(image) = IMAGE.get() {
            return Some(image);
        }
        let image = Image::read()?;
        Some(IMAGE.get_or_init(|| image))
    }

    fn read() -> Option<Image> {
        let exe = std::fs::read_link("/proc/self/exe").ok()?;
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let code: Vec<Range<usize>> = maps
            .lines()
            .filter_map(parse_mapping)
            .filter(|m| m.executable && std::path::Path::new(m.path) == exe)
            .map(|m| m.range)
            .collect();
        let image = Image { code };
        image.contains(anchor as fn() as usize).then_some(image)
    }

    fn contains(&self, address: usize) -> bool {
        self.code.iter().any(|r| r.contains(&address))
    }

    /// The offset of `address` from the anchor, if it is in the executable's code.
    pub(super) fn offset_of(&self, address: usize) -> Option<u64> {
        self.contains(address)
            .then(|| address.wrapping_sub(anchor as fn() as usize) as u64)
    }

    /// The address `offset` names, if it is in the executable's code.
    pub(super) fn address_of(&self, offset: u64) -> Option<usize> {
        let address = (anchor as fn() as usize).wrapping_add(offset as usize);
        self.contains(address).then_some(address)
    }
}

/// One line of `/proc/self/maps`.
pub(super) struct Mapping<'a> {
    range: Range<usize>,
    executable: bool,
    /// May contain spaces.
    path: &'a str,
}

pub(super) fn parse_mapping(line: &str) -> Option<Mapping<'_>> {
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        let (value, tail) = rest.trim_start().split_once(' ')?;
        *field = value;
        rest = tail;
    }
    let (start, end) = fields[0].split_once('-')?;
    Some(Mapping {
        range: usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?,
        executable: fields[1].contains('x'),
        path: rest.trim_start(),
    })
}

pub(crate) fn check_of(offset: u64, fingerprint: u64) -> u64 {
    let hash = fnv1a_continue(fnv1a(b"multiproc task"), &offset.to_le_bytes());
    fnv1a_continue(hash, &fingerprint.to_le_bytes())
}

pub(super) fn fingerprint<X>() -> u64 {
    fnv1a(type_name::<X>().as_bytes())
}

pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(0xcbf2_9ce4_8422_2325, bytes)
}

pub(super) fn fnv1a_continue(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse_with_and_without_paths() {
        let line = "55d0c8a00000-55d0c8a2f000 r-xp 00002000 fe:00 1234    /tmp/a b/prog (deleted)";
        let mapping = parse_mapping(line).unwrap();
        assert_eq!(mapping.range, 0x55d0_c8a0_0000..0x55d0_c8a2_f000);
        assert!(mapping.executable);
        assert_eq!(mapping.path, "/tmp/a b/prog (deleted)");
        let anonymous = "7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ";
        assert_eq!(parse_mapping(anonymous).unwrap().path, "");
        assert!(parse_mapping("7ffd1000-7ffd2000 rw-p 00000000 00:00 0").is_none());
        assert!(parse_mapping("garbage").is_none());
    }
}
