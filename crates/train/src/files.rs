//! Reading the files a user names, and naming them back in output: only
//! regular files, with a size cap, and names that survive any byte.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Larger than any X-ray (a 16-bit 4k×4k DICOM is 32 MiB) and any model
/// file we write (DenseNet201 in f32 is 80 MB), small enough that a wrong
/// path such as `/dev/zero` cannot take the machine's memory.
pub const MAX_INPUT_BYTES: u64 = 1 << 30;

/// A file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct FileError {
    pub path: PathBuf,
    pub problem: FileProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file (it is {0}); expected an image or model file")]
    NotRegular(&'static str),
    #[error("larger than {0} bytes, more than any image or model file")]
    TooLarge(u64),
    #[error("is a directory; expected a file name")]
    IsDirectory,
    #[error("the folder {0} does not exist")]
    NoFolder(PathBuf),
}

fn problem(path: &Path, problem: impl Into<FileProblem>) -> FileError {
    FileError {
        path: path.into(),
        problem: problem.into(),
    }
}

/// Reads a regular file (or a symbolic link to one) of at most `limit` bytes.
/// The file is opened without blocking and checked through its handle, so a
/// FIFO or a device never stalls the caller and cannot be swapped in between.
pub fn read_regular_file(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let io = |source: std::io::Error| problem(path, source);
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
    if !metadata.is_file() {
        return Err(problem(path, FileProblem::NotRegular(kind_of(&metadata.file_type()))));
    }
    if metadata.len() > limit {
        return Err(problem(path, FileProblem::TooLarge(limit)));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    // The cap holds even for a file that grows while it is read.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(problem(path, FileProblem::TooLarge(limit)));
    }
    Ok(bytes)
}

fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "a device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// Checks an output file's path before any work is done: not a directory, in
/// a folder that exists. Folders are never created for an output file.
pub fn check_output_path(path: &Path) -> Result<(), FileError> {
    if path.is_dir() {
        return Err(problem(path, FileProblem::IsDirectory));
    }
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(problem(path, FileProblem::NoFolder(folder.into())));
    }
    Ok(())
}

/// A path as text that one line of output can hold and that maps back to
/// the bytes: `\` becomes `\\`, control characters `\t`, `\n`, `\r` or
/// `\xNN`, and bytes that are not UTF-8 `\xNN`. Ordinary names are unchanged.
pub fn printable_path(path: &Path) -> String {
    let bytes = path_bytes(path);
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() && (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> std::borrow::Cow<'_, [u8]> {
    use std::os::unix::ffi::OsStrExt;
    std::borrow::Cow::Borrowed(path.as_os_str().as_bytes())
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(path.to_string_lossy().into_owned().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_one_line_and_map_back_to_their_bytes() {
        assert_eq!(
            printable_path(Path::new("MURA/patient1/image1.png")),
            "MURA/patient1/image1.png"
        );
        assert_eq!(
            printable_path(Path::new("a\tb\nc\rd\\e\u{1}")),
            "a\\tb\\nc\\rd\\\\e\\x01"
        );
        assert_eq!(printable_path(Path::new("röntgen.png")), "röntgen.png");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let name = std::ffi::OsStr::from_bytes(b"bad\xff\xfe.png");
            assert_eq!(printable_path(Path::new(name)), "bad\\xff\\xfe.png");
        }
    }

    #[test]
    fn only_regular_files_under_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.png");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular_file(&file, 5).unwrap(), b"12345");
        assert!(matches!(
            read_regular_file(&file, 4).unwrap_err().problem,
            FileProblem::TooLarge(4)
        ));
        assert!(matches!(
            read_regular_file(dir.path(), 5).unwrap_err().problem,
            FileProblem::NotRegular("a directory")
        ));
        #[cfg(unix)]
        {
            let link = dir.path().join("link.png");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert_eq!(read_regular_file(&link, 5).unwrap(), b"12345");
            // Opening a FIFO without a writer would block; it is refused at once.
            let fifo = dir.path().join("fifo.png");
            let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo reads a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
            let err = read_regular_file(&fifo, 5).unwrap_err().to_string();
            assert!(err.contains("not a regular file (it is a FIFO)"), "{err}");
            let err = read_regular_file(Path::new("/dev/zero"), 5).unwrap_err().to_string();
            assert!(err.contains("it is a device"), "{err}");
        }
    }

    #[test]
    fn output_paths_need_an_existing_folder_and_must_not_be_folders() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_path(&dir.path().join("model.safetensors")).is_ok());
        assert!(check_output_path(Path::new("model.safetensors")).is_ok());
        assert!(matches!(
            check_output_path(dir.path()).unwrap_err().problem,
            FileProblem::IsDirectory
        ));
        let err = check_output_path(&dir.path().join("missing/model.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing does not exist"), "{err}");
    }
}
