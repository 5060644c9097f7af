/* vsock-probe: the two ends of Kiln's vsock lab test, built static by the test (gcc -static).
 *   vsock-probe connect CID PORT MSG   guest: AF_VSOCK connect, send MSG\n, print the reply line
 *   vsock-probe listen PORT            guest: print "vsock-listening" once listening, accept one
 *                                      AF_VSOCK connection, answer "echo:<line>"
 *   vsock-probe uds-serve PATH         host:  accept one Unix connection, answer "echo:<line>"
 *   vsock-probe uds-connect PATH PORT MSG
 *                                      host:  Firecracker's protocol: "CONNECT PORT\n", print the
 *                                      "OK ..." line, send MSG\n, print the reply line
 * After the line, each client streams BULK bytes of a pattern while reading them back, checks count
 * and pattern, prints "bulk=<bytes>" and closes; each server echoes every byte until end of file.
 * That is far more than one credit window, so flow control is exercised both ways.
 * Exit status 0 on success, 1 on any failure (with a message on stderr). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>

static int fail(const char *what) { perror(what); return 1; }

/* Reads one line (without the newline) into buf; returns its length or -1. */
static int read_line(int fd, char *buf, int cap) {
    int n = 0;
    while (n < cap - 1) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0) return n > 0 ? n : -1;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return n;
}

static int send_line(int fd, const char *s) {
    char out[512];
    int len = snprintf(out, sizeof out, "%s\n", s);
    return write(fd, out, len) == len ? 0 : -1;
}

#define BULK (1024 * 1024)

static int write_all(int fd, const char *buf, int len) {
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w <= 0) return -1;
        buf += w;
        len -= w;
    }
    return 0;
}

static int echo_one(int fd) {
    char line[256], reply[300], buf[8192];
    if (read_line(fd, line, sizeof line) < 0) return fail("read");
    snprintf(reply, sizeof reply, "echo:%s", line);
    if (send_line(fd, reply) < 0) return fail("write");
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) return fail("bulk read");
        if (r == 0) break;
        if (write_all(fd, buf, r) < 0) return fail("bulk write");
    }
    close(fd);
    return 0;
}

/* Streams BULK pattern bytes (from a child, so reading and writing overlap) and checks that the
 * same BULK bytes come back; the caller then closes, which ends the echoing side. */
static int bulk_check(int fd) {
    pid_t child = fork();
    if (child < 0) return fail("fork");
    if (child == 0) {
        alarm(90);
        char buf[4096];
        for (int sent = 0; sent < BULK; sent += sizeof buf) {
            for (int i = 0; i < (int)sizeof buf; i++) buf[i] = (char)((sent + i) % 251);
            if (write_all(fd, buf, sizeof buf) < 0) _exit(1);
        }
        _exit(0);
    }
    char buf[8192];
    long got = 0;
    while (got < BULK) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) return fail("bulk read");
        if (r == 0) { fprintf(stderr, "bulk: end of file after %ld bytes\n", got); return 1; }
        for (ssize_t i = 0; i < r; i++)
            if (buf[i] != (char)((got + i) % 251)) { fprintf(stderr, "bulk: wrong byte at %ld\n", got + i); return 1; }
        got += r;
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { fprintf(stderr, "bulk: writer failed\n"); return 1; }
    printf("bulk=%ld\n", got);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    char line[256];
    alarm(90); /* never outlive a broken transfer (a stuck writer would hold the caller's pipes) */
    if (argc >= 5 && !strcmp(argv[1], "connect")) {
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = atoi(argv[2]), .svm_port = atoi(argv[3])};
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return fail("vsock connect");
        if (send_line(fd, argv[4]) < 0 || read_line(fd, line, sizeof line) < 0) return fail("vsock io");
        printf("%s\n", line);
        fflush(stdout);
        return bulk_check(fd);
    }
    if (argc >= 3 && !strcmp(argv[1], "listen")) {
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = atoi(argv[2])};
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0) return fail("vsock listen");
        printf("vsock-listening\n");
        fflush(stdout);
        int c = accept(fd, NULL, NULL);
        return c < 0 ? fail("vsock accept") : echo_one(c);
    }
    if (argc >= 3 && !strcmp(argv[1], "uds-serve")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        unlink(argv[2]);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0) return fail("uds listen");
        int c = accept(fd, NULL, NULL);
        return c < 0 ? fail("uds accept") : echo_one(c);
    }
    if (argc >= 5 && !strcmp(argv[1], "uds-connect")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return fail("uds connect");
        char cmd[64];
        snprintf(cmd, sizeof cmd, "CONNECT %s", argv[3]);
        if (send_line(fd, cmd) < 0 || read_line(fd, line, sizeof line) < 0) return fail("CONNECT");
        printf("%s\n", line);
        if (send_line(fd, argv[4]) < 0 || read_line(fd, line, sizeof line) < 0) return fail("uds io");
        printf("%s\n", line);
        fflush(stdout);
        return bulk_check(fd);
    }
    fprintf(stderr, "usage: see the comment at the top of vsock-probe.c\n");
    return 1;
}
