//! Fuzzes the SIF reader: any bytes must give a parsed file or a `SifError`, never a panic, and
//! everything `image inspect` derives from a parsed file must be computable.
#![no_main]

use std::io::Cursor;

use cmpirun::image::sif;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = sif::read(&mut Cursor::new(data)) else {
        return;
    };
    let _ = file.header.launch_script();
    let _ = file.header.version();
    let _ = file.header.id_string();
    let _ = file.header.arch.name();
    let _ = sif::format_time(file.header.created_at);
    let _ = sif::human_size(file.header.data_size.max(0) as u64);
    for d in &file.descriptors {
        let _ = d.type_label();
        let _ = d.decoded_extra();
        let _ = d.link();
        let _ = d.name();
        let _ = sif::format_time(d.modified_at);
        // A parsed object lies inside the input.
        assert!(d.offset >= 0 && d.size >= 0);
        assert!((d.offset + d.size) as usize <= data.len());
    }
    let _ = file.primary_partitions();
});
