// Copies the mqtt.js browser bundle (MIT) and its licence into appliance/display/vendor/,
// so the ward page never loads anything from a CDN. Run: cd web && npm ci && npm run vendor
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkgDir = join(here, "node_modules", "mqtt");
const outDir = join(here, "..", "appliance", "display", "vendor");
const version = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;

mkdirSync(outDir, { recursive: true });
copyFileSync(join(pkgDir, "dist", "mqtt.min.js"), join(outDir, "mqtt.min.js"));
copyFileSync(join(pkgDir, "LICENSE.md"), join(outDir, "mqtt.LICENSE.md"));
writeFileSync(join(outDir, "VERSIONS.txt"), `mqtt ${version} (MIT) dist/mqtt.min.js\n`);
console.log(`vendored mqtt ${version} into ${outDir}`);
