/*
 * meshguard-cni: the node-side CNI executable of meshguard's Istio CNI mode (docs/cni.md).
 *
 * A node has no Python, so the runtime does not run meshguard's plugin itself: it runs this
 * small static program, which forwards the CNI call to meshguard's node agent (the chart's
 * DaemonSet, `meshguard cni install --agent-socket ...`) over a unix socket and relays the
 * answer. The agent answers it in-process (meshguard/cni/agent.py) with the image's own
 * iptables.
 *
 * Request (one stream):  "MGCNI1\n", then the CNI_* variables as "KEY=VALUE\0" ... "\0",
 * then the 4-byte big-endian length of stdin and stdin itself. The opened CNI_NETNS travels
 * as a file descriptor (SCM_RIGHTS) with the first bytes, so the agent needs neither the
 * node's /var/run/netns nor its PID namespace.
 * Answer: the plugin's 4-byte big-endian exit status, then its stdout until EOF.
 *
 * Fail closed: when the agent cannot be reached, ADD and CHECK fail with a CNI error object
 * naming the socket (the pod does not start; the message shows in its events). DEL succeeds
 * (the rules live in the namespace being destroyed; a pod must remain deletable), VERSION is
 * answered here.
 *
 * Build: gcc -static -Os -o meshguard-cni meshguard-cni.c
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/var/run/meshguard/cni.sock"
#define MAX_STDIN (4 * 1024 * 1024)
#define VERSIONS "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"

static const char *const VARIABLES[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                        "CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH"};

static void fail(const char *what, const char *path, int error) {
    /* msg is plain ASCII from here (no quotes or backslashes to escape but strerror's). */
    printf("{\"cniVersion\":\"1.0.0\",\"code\":5,\"msg\":\"meshguard-cni: %s %s: %s (is the"
           " meshguard-cni-node DaemonSet running on this node?)\",\"details\":\"\"}\n",
           what, path, strerror(error));
    fflush(stdout);
    exit(1);
}

static int write_all(int fd, const void *data, size_t length) {
    const char *at = data;
    while (length > 0) {
        ssize_t done = write(fd, at, length);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return -1;
        at += done;
        length -= (size_t)done;
    }
    return 0;
}

static int read_all(int fd, void *data, size_t length) {
    char *at = data;
    while (length > 0) {
        ssize_t done = read(fd, at, length);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return -1;
        at += done;
        length -= (size_t)done;
    }
    return 0;
}

static char *read_stdin(uint32_t *length) {
    size_t size = 0, capacity = 65536;
    char *data = malloc(capacity);
    if (data == NULL) fail("cannot allocate for", "stdin", ENOMEM);
    for (;;) {
        if (size == capacity) {
            if (capacity >= MAX_STDIN) fail("configuration too large on", "stdin", EFBIG);
            capacity *= 2;
            data = realloc(data, capacity);
            if (data == NULL) fail("cannot allocate for", "stdin", ENOMEM);
        }
        ssize_t done = read(0, data + size, capacity - size);
        if (done < 0 && errno == EINTR) continue;
        if (done < 0) fail("cannot read", "stdin", errno);
        if (done == 0) break;
        size += (size_t)done;
    }
    *length = (uint32_t)size;
    return data;
}

/* The first bytes of the request, with the namespace's descriptor when there is one. */
static int send_header(int sock, int netns_fd) {
    static const char magic[] = "MGCNI1\n";
    struct iovec iov = {.iov_base = (void *)magic, .iov_len = sizeof(magic) - 1};
    union {
        char buffer[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1};
    if (netns_fd >= 0) {
        memset(&control, 0, sizeof(control));
        message.msg_control = control.buffer;
        message.msg_controllen = sizeof(control.buffer);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(header), &netns_fd, sizeof(int));
    }
    return sendmsg(sock, &message, 0) == (ssize_t)iov.iov_len ? 0 : -1;
}

/* The request; 0, or the errno of the send that failed. */
static int send_request(int sock, int netns_fd, const char *input, uint32_t length) {
    if (send_header(sock, netns_fd) != 0) return errno;
    for (size_t i = 0; i < sizeof(VARIABLES) / sizeof(VARIABLES[0]); i++) {
        const char *value = getenv(VARIABLES[i]);
        if (value == NULL) continue;
        if (write_all(sock, VARIABLES[i], strlen(VARIABLES[i])) != 0 ||
            write_all(sock, "=", 1) != 0 || write_all(sock, value, strlen(value) + 1) != 0)
            return errno;
    }
    unsigned char size[4] = {length >> 24, length >> 16, length >> 8, length};
    if (write_all(sock, "", 1) != 0 || write_all(sock, size, 4) != 0 ||
        write_all(sock, input, length) != 0)
        return errno;
    return 0;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* a closed socket is an error to report, not a silent death */
    const char *command = getenv("CNI_COMMAND");
    const char *path = getenv("MESHGUARD_CNI_SOCKET");
    if (path == NULL || *path == '\0') path = DEFAULT_SOCKET;
    uint32_t length = 0;
    char *input = read_stdin(&length);
    if (command != NULL && strcmp(command, "VERSION") == 0) {
        printf("{\"cniVersion\":\"1.0.0\",\"supportedVersions\":" VERSIONS "}\n");
        return 0;
    }
    int is_del = command != NULL && strcmp(command, "DEL") == 0;

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(address.sun_path)) fail("socket path too long:", path, ENAMETOOLONG);
    strcpy(address.sun_path, path);
    if (sock < 0 || connect(sock, (struct sockaddr *)&address, sizeof(address)) != 0) {
        if (is_del) return 0;
        fail("cannot reach the node agent at", path, errno);
    }
    const char *netns = getenv("CNI_NETNS");
    int netns_fd = -1;
    if (netns != NULL && *netns != '\0') {
        netns_fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (netns_fd < 0 && !(is_del && errno == ENOENT)) fail("cannot open", netns, errno);
    }
    /* The agent may answer before it has read everything (busy: "try again later"): a send
     * that fails is reported only when no answer follows. */
    int send_error = send_request(sock, netns_fd, input, length);
    shutdown(sock, SHUT_WR);

    unsigned char status[4];
    if (read_all(sock, status, 4) != 0) {
        if (send_error != 0) fail("cannot send to the node agent at", path, send_error);
        fail("no answer from the node agent at", path, EPIPE);
    }
    char buffer[65536];
    for (;;) {
        ssize_t done = read(sock, buffer, sizeof(buffer));
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) break;
        if (write_all(1, buffer, (size_t)done) != 0) return 1;
    }
    return (int)(((uint32_t)status[0] << 24) | ((uint32_t)status[1] << 16) |
                 ((uint32_t)status[2] << 8) | status[3]);
}
