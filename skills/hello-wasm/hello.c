/* hello-wasm: a WASI preview 1 command module, the example of a `mode: wasm`
 * skill. Reads its JSON arguments from stdin and prints one JSON line: a
 * greeting, the arguments it got, and the names in /workspace (preopened
 * read-only by openpista). Built by scripts/common.sh (build_wasm_skills):
 *   clang-14 --target=wasm32-wasi -fuse-ld=lld -O2 hello.c -o hello.wasm
 */
#include <dirent.h>
#include <stdio.h>
#include <string.h>

/* Prints `s` as the inside of a JSON string. */
static void json_escape(const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            printf("\\%c", c);
        } else if (c < 0x20) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
}

int main(void) {
    static char args[65536];
    size_t n = fread(args, 1, sizeof args - 1, stdin);
    args[n] = '\0';
    while (n > 0 && (args[n - 1] == '\n' || args[n - 1] == ' ')) {
        args[--n] = '\0';
    }
    printf("{\"greeting\":\"hello from wasm\",\"args\":%s,\"workspace\":[", n ? args : "null");
    DIR *dir = opendir("/workspace");
    if (dir) {
        struct dirent *e;
        int first = 1;
        while ((e = readdir(dir)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
                continue;
            }
            printf(first ? "\"" : ",\"");
            json_escape(e->d_name);
            putchar('"');
            first = 0;
        }
        closedir(dir);
    }
    printf("]}\n");
    return 0;
}
