//! Kernel module lookup and dependency resolution for the initramfs images.
//!
//! Debian's kernel packages ship no `modules.dep` (depmod runs at install time), and the
//! host may have no kmod tools, so dependencies come from one of two places:
//! a `modules.dep` file if the tree has one ([`parse_modules_dep`]), otherwise the
//! `depends=` string in each module's `.modinfo` ELF section ([`modinfo_depends`]).
//! [`resolve_order`] turns either into an insmod order (dependencies first).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// Module names use `_` and `-` interchangeably (`kvm-amd.ko` is module `kvm_amd`).
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path like `kernel/arch/x86/kvm/kvm-amd.ko.xz` (`kvm_amd`).
pub fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(normalize_name(stem))
}

/// One line of `modules.dep`: the module's relative path and the paths it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepEntry {
    /// Path relative to `lib/modules/<release>/`.
    pub path: String,
    /// Names (normalized) of the modules it depends on.
    pub deps: Vec<String>,
}

/// Parses `modules.dep` text (`kernel/a.ko: kernel/b.ko kernel/c.ko` per line) into a map
/// from module name to its entry.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, DepEntry>> {
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, deps) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
        let name = module_name_of(path.trim())
            .ok_or_else(|| anyhow!("modules.dep line {}: {path:?} is not a module", n + 1))?;
        let deps = deps
            .split_whitespace()
            .map(|d| {
                module_name_of(d)
                    .ok_or_else(|| anyhow!("modules.dep line {}: {d:?} is not a module", n + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        map.insert(
            name,
            DepEntry {
                path: path.trim().to_string(),
                deps,
            },
        );
    }
    Ok(map)
}

/// Returns the modules to load for `roots`, dependencies before dependents, each once.
/// `deps_of(name)` gives a module's direct dependencies.
pub fn resolve_order<F>(roots: &[&str], mut deps_of: F) -> Result<Vec<String>>
where
    F: FnMut(&str) -> Result<Vec<String>>,
{
    fn visit<F: FnMut(&str) -> Result<Vec<String>>>(
        name: &str,
        deps_of: &mut F,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        stack.push(name.to_string());
        for dep in deps_of(name).with_context(|| format!("dependencies of module {name}"))? {
            visit(&normalize_name(&dep), deps_of, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for root in roots {
        visit(
            &normalize_name(root),
            &mut deps_of,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// The contents of the section named `wanted` in a 64-bit little-endian ELF file.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8]> {
    let rd = |off: usize, len: usize| -> Result<&'a [u8]> {
        elf.get(
            off..off
                .checked_add(len)
                .ok_or_else(|| anyhow!("ELF offset overflow"))?,
        )
        .ok_or_else(|| anyhow!("ELF truncated at {off:#x}+{len:#x}"))
    };
    let u16_at =
        |off: usize| -> Result<usize> { Ok(u16::from_le_bytes(rd(off, 2)?.try_into()?) as usize) };
    let u32_at =
        |off: usize| -> Result<usize> { Ok(u32::from_le_bytes(rd(off, 4)?.try_into()?) as usize) };
    let u64_at = |off: usize| -> Result<usize> {
        Ok(usize::try_from(u64::from_le_bytes(
            rd(off, 8)?.try_into()?,
        ))?)
    };
    if rd(0, 6)? != b"\x7fELF\x02\x01" {
        bail!("not a 64-bit little-endian ELF file");
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3A)?;
    let shnum = u16_at(0x3C)?;
    let shstrndx = u16_at(0x3E)?;
    if shentsize < 64 {
        bail!("ELF section header size {shentsize} too small");
    }
    let sh = |i: usize| shoff + i * shentsize;
    let strtab_off = u64_at(sh(shstrndx) + 24)?;
    let strtab_size = u64_at(sh(shstrndx) + 32)?;
    let strtab = rd(strtab_off, strtab_size)?;
    for i in 0..shnum {
        let name_off = u32_at(sh(i))?;
        let name = strtab
            .get(name_off..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == wanted.as_bytes() {
            return rd(u64_at(sh(i) + 24)?, u64_at(sh(i) + 32)?);
        }
    }
    bail!("no {wanted} section")
}

/// The `depends=` list from a module's `.modinfo` section contents
/// (NUL-separated `key=value` strings).
pub fn modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(normalize_name)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reads a module file, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` (busybox insmod in the
/// guest may not handle compressed modules).
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else {
        None
    };
    if let Some(tool) = tool {
        let out = Command::new(tool)
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| {
                format!("running `{tool} -dc` to decompress {name} (install {tool})")
            })?;
        if !out.status.success() {
            bail!(
                "`{tool} -dc {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return Ok(out.stdout);
    }
    if name.ends_with(".ko.gz") {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(path)?).read_to_end(&mut v)?;
        return Ok(v);
    }
    fs::read(path).with_context(|| format!("reading {name}"))
}

/// A kernel module tree, `lib/modules/<release>/` of an unpacked kernel package.
#[derive(Debug)]
pub struct ModuleTree {
    root: PathBuf,
    /// Module name -> path relative to `root`.
    paths: BTreeMap<String, String>,
    /// From `modules.dep`, if the tree has one.
    dep_file: Option<BTreeMap<String, DepEntry>>,
}

/// A module ready to go into an initramfs.
#[derive(Debug)]
pub struct ResolvedModule {
    /// Normalized module name.
    pub name: String,
    /// Path relative to `lib/modules/<release>/`, ending in `.ko` (decompressed).
    pub rel_path: String,
    /// Uncompressed module contents.
    pub data: Vec<u8>,
}

impl ModuleTree {
    /// Indexes all modules under `root`.
    pub fn open(root: &Path) -> Result<Self> {
        let mut paths = BTreeMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let dir = root.join(&rel);
            for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                let e = e?;
                let rel_child = rel.join(e.file_name());
                if e.file_type()?.is_dir() {
                    todo.push(rel_child);
                } else {
                    let s = rel_child.to_string_lossy().into_owned();
                    if let Some(name) = module_name_of(&s) {
                        paths.insert(name, s);
                    }
                }
            }
        }
        let dep_path = root.join("modules.dep");
        let dep_file = if dep_path.exists() {
            Some(parse_modules_dep(&fs::read_to_string(&dep_path)?)?)
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            paths,
            dep_file,
        })
    }

    /// Resolves `roots` with their dependencies, in load order, with contents.
    pub fn resolve(&self, roots: &[&str]) -> Result<Vec<ResolvedModule>> {
        let mut cache: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let order = resolve_order(roots, |name| {
            if let Some(dep) = &self.dep_file {
                return dep
                    .get(name)
                    .map(|e| e.deps.clone())
                    .ok_or_else(|| anyhow!("module {name} not in modules.dep"));
            }
            let data = self.load(name)?;
            let deps = modinfo_depends(elf_section(&data, ".modinfo")?);
            cache.insert(name.to_string(), data);
            Ok(deps)
        })?;
        order
            .into_iter()
            .map(|name| {
                let data = match cache.remove(&name) {
                    Some(d) => d,
                    None => self.load(&name)?,
                };
                let rel = &self.paths[&name];
                let rel_path = match rel.find(".ko") {
                    Some(i) => format!("{}.ko", &rel[..i]),
                    None => rel.clone(),
                };
                Ok(ResolvedModule {
                    name,
                    rel_path,
                    data,
                })
            })
            .collect()
    }

    fn load(&self, name: &str) -> Result<Vec<u8>> {
        let rel = self.paths.get(name).ok_or_else(|| {
            anyhow!(
                "module {name} not found under {} (built in, or not in this kernel?)",
                self.root.display()
            )
        })?;
        read_module(&self.root.join(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/drivers/crypto/ccp/ccp.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
";

    fn from_map(map: &BTreeMap<String, DepEntry>) -> impl FnMut(&str) -> Result<Vec<String>> + '_ {
        |n| {
            map.get(n)
                .map(|e| e.deps.clone())
                .ok_or_else(|| anyhow!("unknown {n}"))
        }
    }

    #[test]
    fn parses_modules_dep() {
        let map = parse_modules_dep(DEP).unwrap();
        assert_eq!(map.len(), 8);
        assert_eq!(
            map["virtio_pci"].deps,
            ["virtio_ring", "virtio_pci_modern_dev", "virtio"]
        );
        assert_eq!(
            map["virtio_pci_modern_dev"].path,
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz"
        );
        assert_eq!(map["kvm_amd"].deps, ["kvm", "ccp", "irqbypass"]);
        assert!(parse_modules_dep("no colon here").is_err());
    }

    #[test]
    fn resolves_dependencies_first_once() {
        let map = parse_modules_dep(DEP).unwrap();
        let order = resolve_order(&["virtio_pci", "kvm-amd", "virtio"], from_map(&map)).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio",
                "virtio_pci",
                "irqbypass",
                "kvm",
                "ccp",
                "kvm_amd"
            ]
        );
        assert!(resolve_order(&["nope"], from_map(&map)).is_err());
    }

    #[test]
    fn detects_cycles() {
        let map = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        let err = resolve_order(&["a"], from_map(&map)).unwrap_err();
        assert!(format!("{err:#}").contains("cycle"), "{err:#}");
    }

    #[test]
    fn names() {
        assert_eq!(module_name_of("kernel/x/kvm-amd.ko").unwrap(), "kvm_amd");
        assert_eq!(module_name_of("a/virtio_net.ko.zst").unwrap(), "virtio_net");
        assert_eq!(module_name_of("a/modules.dep"), None);
    }

    /// Builds a minimal ELF64 with a null section, .shstrtab and .modinfo.
    fn tiny_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        while elf.len() % 8 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_modinfo_depends() {
        let elf =
            tiny_elf(b"license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0");
        let info = elf_section(&elf, ".modinfo").unwrap();
        assert_eq!(
            modinfo_depends(info),
            ["virtio_ring", "virtio", "net_failover"]
        );
        let elf = tiny_elf(b"depends=\0name=virtio\0");
        assert!(modinfo_depends(elf_section(&elf, ".modinfo").unwrap()).is_empty());
        assert!(elf_section(&elf, ".text").is_err());
        assert!(elf_section(b"not an elf", ".modinfo").is_err());
    }
}
