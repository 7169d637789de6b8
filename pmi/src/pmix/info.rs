//! `pmix_info_t` arrays built from Rust values, owning everything they point at (strings,
//! nested arrays) for as long as the library may read them.

use std::ffi::{CString, c_void};

use super::ffi::{self, DataArray, Info, Value, ValueData, types};

/// A value of an info entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoValue {
    /// `PMIX_BOOL`.
    Bool(bool),
    /// `PMIX_STRING`.
    Str(String),
    /// `PMIX_UINT16`.
    U16(u16),
    /// `PMIX_UINT32`.
    U32(u32),
    /// `PMIX_PROC_RANK`.
    Rank(u32),
    /// `PMIX_DATA_ARRAY` of `PMIX_INFO`.
    Array(Vec<(String, InfoValue)>),
}

/// An array of `pmix_info_t` and the memory its entries point at. The entries' addresses stay
/// put while it lives (nothing is pushed after [`InfoList::new`]).
pub struct InfoList {
    infos: Vec<Info>,
    _strings: Vec<CString>,
    // Boxed: the entries point at each array, which must not move when the vector grows.
    #[allow(clippy::vec_box)]
    _arrays: Vec<Box<DataArray>>,
    _nested: Vec<InfoList>,
}

impl InfoList {
    /// Builds the array of `entries` (keys are PMIx attribute names, `pmix.rank`).
    pub fn new(entries: &[(String, InfoValue)]) -> InfoList {
        let mut list = InfoList {
            infos: Vec::with_capacity(entries.len()),
            _strings: Vec::new(),
            _arrays: Vec::new(),
            _nested: Vec::new(),
        };
        for (key, value) in entries {
            let value = list.value(value);
            let mut info = Info {
                key: [0; ffi::KEY_LEN],
                flags: 0,
                value,
            };
            ffi::fill(&mut info.key, key);
            list.infos.push(info);
        }
        list
    }

    fn value(&mut self, v: &InfoValue) -> Value {
        let mut data = ValueData { bytes: [0; 3] };
        let type_ = match v {
            InfoValue::Bool(b) => {
                data.flag = *b;
                types::BOOL
            }
            InfoValue::U16(n) => {
                data.uint16 = *n;
                types::UINT16
            }
            InfoValue::U32(n) => {
                data.uint32 = *n;
                types::UINT32
            }
            InfoValue::Rank(n) => {
                data.uint32 = *n;
                types::PROC_RANK
            }
            InfoValue::Str(s) => {
                // A NUL inside would cut the string; none of the values built here has one.
                let c = CString::new(s.replace('\0', "")).unwrap_or_default();
                data.string = c.as_ptr().cast_mut();
                self._strings.push(c);
                types::STRING
            }
            InfoValue::Array(entries) => {
                let mut nested = InfoList::new(entries);
                let mut array = Box::new(DataArray {
                    type_: types::INFO,
                    size: nested.infos.len(),
                    array: nested.infos.as_mut_ptr().cast::<c_void>(),
                });
                data.darray = &mut *array;
                self._arrays.push(array);
                self._nested.push(nested);
                types::DATA_ARRAY
            }
        };
        Value { type_, data }
    }

    /// The first entry, for the library (which only reads it).
    pub fn as_mut_ptr(&mut self) -> *mut Info {
        self.infos.as_mut_ptr()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_arrays_and_strings_point_at_owned_memory() {
        let mut list = InfoList::new(&[
            ("pmix.jobid".into(), InfoValue::Str("job-1".into())),
            ("pmix.job.size".into(), InfoValue::U32(4)),
            (
                "pmix.node.arr".into(),
                InfoValue::Array(vec![
                    ("pmix.hname".into(), InfoValue::Str("vm".into())),
                    ("pmix.lrank".into(), InfoValue::U16(3)),
                ]),
            ),
        ]);
        assert_eq!(list.len(), 3);
        let infos = list.as_mut_ptr();
        // SAFETY: `infos` points at the list's 3 entries, alive for this test; every pointer
        // read below was set by `InfoList::new` to memory the list owns.
        unsafe {
            let first = &*infos;
            assert_eq!(ffi::text(&first.key), "pmix.jobid");
            assert_eq!(first.value.type_, types::STRING);
            let s = std::ffi::CStr::from_ptr(first.value.data.string);
            assert_eq!(s.to_str().unwrap(), "job-1");
            assert_eq!((*infos.add(1)).value.data.uint32, 4);
            let arr = &*(*infos.add(2)).value.data.darray;
            assert_eq!((arr.type_, arr.size), (types::INFO, 2));
            let inner = &*(arr.array as *const Info).add(1);
            assert_eq!(ffi::text(&inner.key), "pmix.lrank");
            assert_eq!(inner.value.data.uint16, 3);
        }
    }
}
