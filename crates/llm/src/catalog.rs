//! The model catalog: `.gguf` files under the models directory and what their
//! GGUF metadata says (architecture, context length, quantization).
//!
//! Only the metadata header is read (llama.cpp's `gguf` reader with
//! `no_alloc`), never the weights.

use std::path::{Path, PathBuf};

use llama_cpp_2::gguf::GgufContext;

use crate::LlmError;

/// One model file as listed by `openpista models`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// File name (what `[llm.local] model` may name).
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub architecture: Option<String>,
    pub context_length: Option<u64>,
    pub quantization: Option<String>,
    /// Why the metadata could not be read, for files that are not valid GGUF.
    pub error: Option<String>,
}

/// Every `.gguf` file under `dir`, recursively, sorted by path. A missing
/// directory is an empty catalog.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, LlmError> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| LlmError::Config(format!("reading models dir {}: {e}", d.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Lists the models under `dir` with their metadata.
pub fn list(dir: &Path) -> Result<Vec<ModelInfo>, LlmError> {
    Ok(discover(dir)?.iter().map(|p| inspect(p)).collect())
}

/// Reads one file's metadata. Never fails: problems land in `error`.
pub fn inspect(path: &Path) -> ModelInfo {
    let mut info = ModelInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: path.to_path_buf(),
        size_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        architecture: None,
        context_length: None,
        quantization: None,
        error: None,
    };
    if let Err(e) = check_header(path) {
        info.error = Some(e.to_string());
        return info;
    }
    let Some(ctx) = GgufContext::from_file(path) else {
        info.error = Some("GGUF metadata could not be parsed (corrupt or truncated file)".into());
        return info;
    };
    info.architecture = string_val(&ctx, "general.architecture");
    if let Some(arch) = &info.architecture {
        info.context_length = int_val(&ctx, &format!("{arch}.context_length"));
    }
    info.quantization = int_val(&ctx, "general.file_type")
        .and_then(|ft| file_type_name(ft).map(str::to_owned))
        .or_else(|| quant_from_name(&info.name));
    info
}

/// Checks the GGUF magic, so that a file that is not GGUF at all gets a clear
/// error before any C++ code sees it.
pub fn check_header(path: &Path) -> Result<(), LlmError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) => Err(LlmError::ModelLoad {
            path: path.display().to_string(),
            reason: "not a GGUF file (bad magic bytes)".into(),
        }),
        Err(e) => Err(LlmError::ModelLoad {
            path: path.display().to_string(),
            reason: format!("cannot read the file header: {e}"),
        }),
    }
}

const GGUF_TYPE_UINT8: u32 = 0;
const GGUF_TYPE_UINT16: u32 = 2;
const GGUF_TYPE_UINT32: u32 = 4;
const GGUF_TYPE_INT32: u32 = 5;
const GGUF_TYPE_STRING: u32 = 8;
const GGUF_TYPE_UINT64: u32 = 10;

fn string_val(ctx: &GgufContext, key: &str) -> Option<String> {
    let idx = ctx.find_key(key);
    if idx < 0 || ctx.kv_type(idx) != GGUF_TYPE_STRING {
        return None;
    }
    ctx.val_str(idx).map(str::to_owned)
}

fn int_val(ctx: &GgufContext, key: &str) -> Option<u64> {
    let idx = ctx.find_key(key);
    if idx < 0 {
        return None;
    }
    // Typed getters abort on a type mismatch, so check the type first.
    match ctx.kv_type(idx) {
        GGUF_TYPE_UINT32 => Some(u64::from(ctx.val_u32(idx))),
        GGUF_TYPE_INT32 => u64::try_from(ctx.val_i32(idx)).ok(),
        GGUF_TYPE_UINT64 => Some(ctx.val_u64(idx)),
        GGUF_TYPE_UINT8 | GGUF_TYPE_UINT16 => None,
        _ => None,
    }
}

/// llama.cpp's `llama_ftype` names.
fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        _ => return None,
    })
}

fn quant_from_name(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    [
        "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "F16", "BF16",
    ]
    .iter()
    .find(|q| upper.contains(*q))
    .map(|q| (*q).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_gguf_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("nested");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("broken.gguf"), b"this is not a model").unwrap();
        std::fs::write(dir.path().join("readme.txt"), b"x").unwrap();
        let models = list(dir.path()).unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].name, "broken.gguf");
        assert!(models[0].error.as_deref().unwrap().contains("not a GGUF"));
    }

    #[test]
    fn truncated_gguf_header_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trunc.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff").unwrap();
        let info = inspect(&p);
        assert!(info.error.is_some(), "{info:?}");
    }

    #[test]
    fn missing_dir_is_empty() {
        assert!(
            discover(Path::new("/nonexistent/openpista/models"))
                .unwrap()
                .is_empty()
        );
    }
}
