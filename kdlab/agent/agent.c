/*
 * kdlab-agent: runs commands in a kdlab guest for kdlabd.
 *
 * It reads frames from a virtio-serial port (or, for tests, an inherited
 * descriptor), starts processes, streams their output back with flow control
 * and reports how they ended. The protocol is specified in the docstring of
 * kdlab/agent/protocol.py; this file follows it, keep both in step.
 *
 * One thread, one poll() loop, nonblocking descriptors; SIGCHLD arrives on a
 * signalfd. Memory is bounded whatever the host sends: input frames are at
 * most MAX_PAYLOAD, each session buffers at most WINDOW bytes of stdin, and
 * the outbound buffer stops the reading of pipes (OUT_SOFT), then of the
 * port (OUT_HARD), when the host does not take it.
 *
 * Usage: kdlab-agent [--port PATH | --fd N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define VERSION 1
#define HEADER 12
#define MAX_PAYLOAD 65536
#define WINDOW (256 * 1024)
#define MAX_SESSIONS 64
#define OUT_SOFT (128 * 1024)	/* stop reading pipes above this */
#define OUT_HARD (512 * 1024)	/* stop taking frames from the port above this */
#define IN_CAP (HEADER + MAX_PAYLOAD)
#define RETRY_MS 100		/* a port without a host: look again after */
#define OPEN_RETRY_MS 500	/* a port not there yet (module not loaded) */
#define DEFAULT_PORT "/dev/virtio-ports/org.kdlab.agent.0"

enum frame_type {
	T_HELLO = 1, T_SPAWN, T_STARTED, T_ERROR, T_STDOUT, T_STDERR, T_EOF,
	T_EXIT, T_STDIN, T_STDIN_EOF, T_SIGNAL, T_RESIZE, T_ACK, T_CLOSE,
};

enum record_kind { R_ARGV = 1, R_ENV, R_CWD, R_TTY, R_STDIN };

extern char **environ;

struct session {
	uint32_t id;		/* 0: a free slot */
	pid_t pid;
	bool reaped;
	int status;
	bool tty;
	int out[2];		/* stdout (or the terminal) and stderr; -1 after EOF */
	uint32_t unacked[2];
	int in;			/* stdin pipe or the terminal; -1: none or closed */
	bool in_eof;		/* close stdin once its buffer is written */
	uint8_t *inbuf;		/* WINDOW bytes, allocated on the first STDIN */
	size_t instart, inlen;
};

static struct session sessions[MAX_SESSIONS];
static int port = -1;
static bool fd_mode;		/* --fd: the peer's EOF is final, exit */
static bool connected;		/* false: the port hung up, wait until retry_at */
static uint64_t retry_at;
static bool synced;		/* framing known: hunting for a HELLO when false */
static uint8_t inbuf[IN_CAP];
static size_t inlen;
static struct {
	uint8_t *data;
	size_t start, len, cap;
} out;

static void note(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("kdlab-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void put_header(uint8_t *p, uint32_t len, uint32_t id, uint16_t type)
{
	put32(p, len);
	put32(p + 4, id);
	p[8] = type >> 8;
	p[9] = type;
	p[10] = 0;
	p[11] = 0;
}

/* Room for n more bytes at the end of the outbound buffer, or NULL. */
static uint8_t *out_reserve(size_t n)
{
	if (out.start + out.len + n > out.cap && out.start) {
		memmove(out.data, out.data + out.start, out.len);
		out.start = 0;
	}
	if (out.len + n > out.cap) {
		size_t cap = out.cap * 2 > out.len + n ? out.cap * 2 : out.len + n;
		uint8_t *data = realloc(out.data, cap);

		if (!data)
			return NULL;
		out.data = data;
		out.cap = cap;
	}
	return out.data + out.start + out.len;
}

static void emit(uint16_t type, uint32_t id, const void *payload, size_t len)
{
	uint8_t *p = out_reserve(HEADER + len);

	if (!p) {
		note("out of memory: a frame dropped");
		return;
	}
	put_header(p, len, id, type);
	if (len)
		memcpy(p + HEADER, payload, len);
	out.len += HEADER + len;
}

static void emit_u32(uint16_t type, uint32_t id, uint32_t value)
{
	uint8_t b[4];

	put32(b, value);
	emit(type, id, b, 4);
}

static void emit_ack(uint32_t id, uint8_t stream, uint32_t count)
{
	uint8_t b[5];

	b[0] = stream;
	put32(b + 1, count);
	emit(T_ACK, id, b, 5);
}

static void emit_error(uint32_t id, int err, const char *fmt, ...)
{
	uint8_t b[4 + 512];
	va_list ap;
	int n;

	put32(b, (uint32_t)err);
	va_start(ap, fmt);
	n = vsnprintf((char *)b + 4, sizeof(b) - 4, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(b) - 5)
		n = sizeof(b) - 5;
	emit(T_ERROR, id, b, 4 + (size_t)n);
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static struct session *find(uint32_t id)
{
	if (!id)
		return NULL;
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i].id == id)
			return &sessions[i];
	return NULL;
}

static void close_stdin(struct session *s)
{
	if (s->in >= 0 && !s->tty)
		close(s->in);
	s->in = -1;
}

/* The process no longer takes stdin: what the host sent counts as taken. */
static void drop_stdin(struct session *s)
{
	if (s->inlen)
		emit_ack(s->id, 0, (uint32_t)s->inlen);
	s->instart = s->inlen = 0;
	close_stdin(s);
}

static void end_output(struct session *s, int stream)
{
	int fd = s->out[stream];

	s->out[stream] = -1;
	if (s->tty) {
		/* The terminal is stdin too: nobody is left to read it. */
		s->instart = s->inlen = 0;
		s->in = -1;
	}
	close(fd);
}

/* Forget a session; its processes are killed unless it ended. */
static void forget(struct session *s, bool kill_group)
{
	if (kill_group && s->pid > 0)
		kill(-s->pid, SIGKILL);
	close_stdin(s);
	for (int i = 0; i < 2; i++)
		if (s->out[i] >= 0)
			close(s->out[i]);
	free(s->inbuf);
	memset(s, 0, sizeof(*s));
}

static void forget_all(void)
{
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i].id)
			forget(&sessions[i], true);
}

/* The host went away (or a new one came): nothing of the old one is kept. */
static void hang_up(void)
{
	forget_all();
	out.start = out.len = 0;
	inlen = 0;
	synced = false;
	if (fd_mode)
		exit(0);
	connected = false;
	retry_at = now_ms() + RETRY_MS;
}

struct spawn_request {
	char **argv;
	char **envp;
	const char *cwd;
	bool tty, want_stdin;
	struct winsize ws;
};

static bool has_key(char **envp, size_t n, const char *var)
{
	size_t klen = strcspn(var, "=");

	for (size_t i = 0; i < n; i++)
		if (!strncmp(envp[i], var, klen) && envp[i][klen] == '=')
			return true;
	return false;
}

/*
 * Parse SPAWN's records into *req, with its strings copied into *strings
 * (one allocation for all, freed by the caller). Returns an errno or 0.
 */
static int parse_spawn(const uint8_t *p, size_t len, struct spawn_request *req,
		       char **strings, const char **why)
{
	static char *defaults[] = {
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
	};
	size_t argc = 0, envc = 0, pos, total = 0;
	char *copy;

	memset(req, 0, sizeof(*req));
	req->cwd = "/";
	for (pos = 0; pos < len;) {
		uint32_t rlen;
		uint8_t kind;

		if (len - pos < 5) {
			*why = "truncated record";
			return EINVAL;
		}
		kind = p[pos];
		rlen = get32(p + pos + 1);
		pos += 5;
		if (rlen > len - pos) {
			*why = "record longer than the frame";
			return EINVAL;
		}
		if (kind == R_ARGV || kind == R_ENV || kind == R_CWD) {
			if (memchr(p + pos, 0, rlen)) {
				*why = "string with a NUL byte";
				return EINVAL;
			}
			if (kind == R_ENV && (!rlen || p[pos] == '=' ||
					      !memchr(p + pos, '=', rlen))) {
				*why = "environment variable without NAME=";
				return EINVAL;
			}
			argc += kind == R_ARGV;
			envc += kind == R_ENV;
			total += rlen + 1;
		} else if (kind == R_TTY && rlen != 4) {
			*why = "terminal size of the wrong length";
			return EINVAL;
		}
		pos += rlen;
	}
	if (!argc) {
		*why = "no command";
		return EINVAL;
	}
	req->argv = calloc(argc + 1, sizeof(char *));
	req->envp = calloc(envc + 3, sizeof(char *));
	copy = *strings = malloc(total + 1);
	if (!req->argv || !req->envp || !copy) {
		*why = "out of memory";
		return ENOMEM;
	}
	argc = envc = 0;
	for (pos = 0; pos < len;) {
		uint8_t kind = p[pos];
		uint32_t rlen = get32(p + pos + 1);
		const uint8_t *v = p + pos + 5;

		pos += 5 + rlen;
		switch (kind) {
		case R_ARGV:
		case R_ENV:
		case R_CWD:
			memcpy(copy, v, rlen);
			copy[rlen] = 0;
			if (kind == R_ARGV)
				req->argv[argc++] = copy;
			else if (kind == R_ENV)
				req->envp[envc++] = copy;
			else
				req->cwd = copy;
			copy += rlen + 1;
			break;
		case R_TTY:
			req->tty = true;
			req->ws.ws_row = get16(v);
			req->ws.ws_col = get16(v + 2);
			break;
		case R_STDIN:
			req->want_stdin = true;
			break;
		default:	/* a kind of a later version: not ours */
			break;
		}
	}
	for (size_t i = 0; i < 2; i++)
		if (!has_key(req->envp, envc, defaults[i]))
			req->envp[envc++] = defaults[i];
	return 0;
}

struct child_failure {
	int stage;		/* 1 chdir, 2 exec, 3 set-up */
	int err;
};

/* In the child, after fork(): set up and exec, or report why not. */
static void child(const struct spawn_request *req, int slave, int in, int o, int e,
		  int report)
{
	struct child_failure f = { 3, 0 };
	sigset_t none;

	/* A backgrounded agent may have SIGINT ignored, which exec would keep. */
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (setsid() < 0)
		goto fail;
	if (req->tty) {
		if (ioctl(slave, TIOCSCTTY, 0) < 0)
			goto fail;
		in = o = e = slave;
	} else if (in < 0 && (in = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
		goto fail;
	}
	if (dup2(in, 0) < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0)
		goto fail;
	if (chdir(req->cwd) < 0) {
		f.stage = 1;
		goto fail;
	}
	environ = req->envp;
	execvp(req->argv[0], req->argv);
	f.stage = 2;
fail:
	f.err = errno;
	if (write(report, &f, sizeof(f)) < 0)
		_exit(126);
	_exit(127);
}

static void close_all(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

static void start(uint32_t id, const struct spawn_request *req)
{
	struct session *s = NULL;
	/* master, slave, stdin r/w, stdout r/w, stderr r/w, report r/w */
	int fd[10] = { -1, -1, -1, -1, -1, -1, -1, -1, -1, -1 };
	struct child_failure f;
	ssize_t n;
	pid_t pid;

	for (int i = 0; i < MAX_SESSIONS && !s; i++)
		if (!sessions[i].id)
			s = &sessions[i];
	if (!s) {
		emit_error(id, EAGAIN, "too many commands at once (%d)", MAX_SESSIONS);
		return;
	}
	if (req->tty) {
		char name[64];

		fd[0] = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (fd[0] < 0 || grantpt(fd[0]) || unlockpt(fd[0]) ||
		    ptsname_r(fd[0], name, sizeof(name)) ||
		    (fd[1] = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 ||
		    ioctl(fd[0], TIOCSWINSZ, &req->ws) < 0) {
			emit_error(id, errno, "cannot make a terminal: %s", strerror(errno));
			close_all(fd, 10);
			return;
		}
	} else if ((req->want_stdin && pipe2(fd + 2, O_CLOEXEC)) ||
		   pipe2(fd + 4, O_CLOEXEC) || pipe2(fd + 6, O_CLOEXEC)) {
		emit_error(id, errno, "cannot make pipes: %s", strerror(errno));
		close_all(fd, 10);
		return;
	}
	if (pipe2(fd + 8, O_CLOEXEC) || (pid = fork()) < 0) {
		emit_error(id, errno, "cannot start a process: %s", strerror(errno));
		close_all(fd, 10);
		return;
	}
	if (!pid)
		child(req, fd[1], fd[2], fd[5], fd[7], fd[9]);
	/* The child's ends; the report pipe reads EOF once exec succeeded. */
	close_all((int[]){ fd[1], fd[2], fd[5], fd[7], fd[9] }, 5);
	do
		n = read(fd[8], &f, sizeof(f));
	while (n < 0 && errno == EINTR);
	close(fd[8]);
	if (n == sizeof(f)) {
		waitpid(pid, NULL, 0);
		close_all((int[]){ fd[0], fd[3], fd[4], fd[6] }, 4);
		if (f.stage == 1)
			emit_error(id, f.err, "cannot change directory to %s: %s", req->cwd,
				   strerror(f.err));
		else if (f.stage == 2)
			emit_error(id, f.err, "%s: %s", req->argv[0], strerror(f.err));
		else
			emit_error(id, f.err, "cannot set up the process: %s",
				   strerror(f.err));
		return;
	}
	memset(s, 0, sizeof(*s));
	s->id = id;
	s->pid = pid;
	s->tty = req->tty;
	if (req->tty) {
		s->out[0] = s->in = fd[0];
		s->out[1] = -1;
	} else {
		s->out[0] = fd[4];
		s->out[1] = fd[6];
		s->in = fd[3];
	}
	for (int i = 0; i < 2; i++)
		if (s->out[i] >= 0)
			set_nonblock(s->out[i]);
	if (s->in >= 0 && !s->tty)
		set_nonblock(s->in);
	emit_u32(T_STARTED, id, (uint32_t)pid);
	if (s->tty)
		emit(T_EOF, id, (uint8_t[]){ 2 }, 1);
}

static void on_spawn(uint32_t id, const uint8_t *p, size_t len)
{
	struct spawn_request req;
	char *strings = NULL;
	const char *why = "";
	int err;

	if (!id)
		return;
	if (find(id)) {
		emit_error(id, EEXIST, "session %u exists", id);
		return;
	}
	err = parse_spawn(p, len, &req, &strings, &why);
	if (err)
		emit_error(id, err, "invalid SPAWN: %s", why);
	else
		start(id, &req);
	free(req.argv);
	free(req.envp);
	free(strings);
}

static void on_stdin(struct session *s, const uint8_t *p, size_t len)
{
	size_t take = len;

	if (s->in < 0 || s->in_eof) {
		take = 0;
	} else {
		if (!s->inbuf && !(s->inbuf = malloc(WINDOW)))
			take = 0;
		/* More than the window: the host broke the protocol, drop it. */
		if (take > WINDOW - s->inlen)
			take = WINDOW - s->inlen;
	}
	if (take) {
		if (s->instart + s->inlen + take > WINDOW) {
			memmove(s->inbuf, s->inbuf + s->instart, s->inlen);
			s->instart = 0;
		}
		memcpy(s->inbuf + s->instart + s->inlen, p, take);
		s->inlen += take;
	}
	if (len > take)
		emit_ack(s->id, 0, (uint32_t)(len - take));
}

static void handle(uint32_t id, uint16_t type, const uint8_t *p, size_t len)
{
	struct session *s;

	if (type == T_HELLO) {
		forget_all();
		out.start = out.len = 0;
		emit_u32(T_HELLO, id, VERSION);
		return;
	}
	if (type == T_SPAWN) {
		on_spawn(id, p, len);
		return;
	}
	s = find(id);
	if (!s)
		return;
	switch (type) {
	case T_STDIN:
		on_stdin(s, p, len);
		break;
	case T_STDIN_EOF:
		s->in_eof = true;
		if (!s->inlen)
			close_stdin(s);
		break;
	case T_SIGNAL:
		if (len == 4)
			kill(-s->pid, (int)get32(p));
		break;
	case T_RESIZE:
		if (len == 4 && s->tty && s->out[0] >= 0) {
			struct winsize ws = { .ws_row = get16(p), .ws_col = get16(p + 2) };

			ioctl(s->out[0], TIOCSWINSZ, &ws);
		}
		break;
	case T_ACK:
		if (len == 5 && (p[0] == 1 || p[0] == 2)) {
			uint32_t *unacked = &s->unacked[p[0] - 1];
			uint32_t count = get32(p + 1);

			*unacked -= count < *unacked ? count : *unacked;
		}
		break;
	case T_CLOSE:
		forget(s, true);
		break;
	default:		/* a type of a later version, or one the host never sends */
		break;
	}
}

static const uint8_t *find_hello(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i + HEADER <= len; i++)
		if (get32(p + i) == 4 && get16(p + i + 8) == T_HELLO && !get16(p + i + 10))
			return p + i;
	return NULL;
}

/* Handle the complete frames read from the port, while the output has room. */
static void process_input(void)
{
	size_t pos = 0;

	while (out.len < OUT_HARD) {
		const uint8_t *p = inbuf + pos;
		size_t avail = inlen - pos;
		uint32_t len;

		if (!synced) {
			const uint8_t *hello = find_hello(p, avail);

			if (!hello) {
				/* Keep what could be the start of a HELLO's header. */
				if (avail >= HEADER)
					pos += avail - (HEADER - 1);
				break;
			}
			pos += (size_t)(hello - p);
			synced = true;
			continue;
		}
		if (avail < HEADER)
			break;
		len = get32(p);
		if (len > MAX_PAYLOAD) {
			note("a frame of %u bytes: hunting for the next HELLO", len);
			synced = false;
			pos++;
			continue;
		}
		if (avail < HEADER + len)
			break;
		handle(get32(p + 4), get16(p + 8), p + HEADER, len);
		pos += HEADER + len;
	}
	memmove(inbuf, inbuf + pos, inlen - pos);
	inlen -= pos;
}

static void read_port(short revents)
{
	ssize_t n;

	if (inlen == IN_CAP) {
		/* Held back (OUT_HARD): only a hang-up matters now. */
		if (revents & (POLLHUP | POLLERR))
			hang_up();
		return;
	}
	n = read(port, inbuf + inlen, IN_CAP - inlen);
	if (n > 0) {
		inlen += (size_t)n;
		process_input();
	} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
		hang_up();
	}
}

static void write_port(void)
{
	ssize_t n = write(port, out.data + out.start, out.len);

	if (n > 0) {
		out.start += (size_t)n;
		out.len -= (size_t)n;
		if (!out.len)
			out.start = 0;
		/* Room again: frames left waiting in the input can go on. */
		if (out.len < OUT_HARD && inlen)
			process_input();
	} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
		hang_up();
	}
}

static void read_output(struct session *s, int stream)
{
	size_t room = WINDOW - s->unacked[stream];
	size_t want = room < MAX_PAYLOAD ? room : MAX_PAYLOAD;
	uint8_t *p;
	ssize_t n;

	/* Several pipes may be ready at once: each one checks the bound. */
	if (out.len >= OUT_SOFT || !room || !(p = out_reserve(HEADER + want)))
		return;
	n = read(s->out[stream], p + HEADER, want);
	if (n > 0) {
		put_header(p, (uint32_t)n, s->id, stream ? T_STDERR : T_STDOUT);
		out.len += HEADER + (size_t)n;
		s->unacked[stream] += (uint32_t)n;
	} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
		/* EIO: a terminal whose last user closed it. */
		emit(T_EOF, s->id, (uint8_t[]){ (uint8_t)(stream + 1) }, 1);
		end_output(s, stream);
	}
}

static void write_stdin(struct session *s)
{
	ssize_t n;

	if (!s->inlen)
		return;
	n = write(s->in, s->inbuf + s->instart, s->inlen);
	if (n > 0) {
		emit_ack(s->id, 0, (uint32_t)n);
		s->instart += (size_t)n;
		s->inlen -= (size_t)n;
		if (!s->inlen) {
			s->instart = 0;
			if (s->in_eof)
				close_stdin(s);
		}
	} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
		drop_stdin(s);
	}
}

static void reap(int sigfd)
{
	struct signalfd_siginfo info;
	int status;
	pid_t pid;

	while (read(sigfd, &info, sizeof(info)) > 0)
		;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		for (int i = 0; i < MAX_SESSIONS; i++)
			if (sessions[i].id && sessions[i].pid == pid) {
				sessions[i].reaped = true;
				sessions[i].status = status;
			}
}

/* EXIT for the sessions whose process was reaped and whose output ended. */
static void finish(void)
{
	for (int i = 0; i < MAX_SESSIONS; i++) {
		struct session *s = &sessions[i];
		uint8_t b[8];

		if (!s->id || !s->reaped || s->out[0] >= 0 || s->out[1] >= 0)
			continue;
		if (WIFSIGNALED(s->status)) {
			put32(b, (uint32_t)-1);
			put32(b + 4, (uint32_t)WTERMSIG(s->status));
		} else {
			put32(b, (uint32_t)WEXITSTATUS(s->status));
			put32(b + 4, 0);
		}
		emit(T_EXIT, s->id, b, 8);
		forget(s, false);
	}
}

static int open_port(const char *path)
{
	bool told = false;

	for (;;) {
		int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);

		if (fd >= 0)
			return fd;
		if (!told)
			note("waiting for %s: %s", path, strerror(errno));
		told = true;
		usleep(OPEN_RETRY_MS * 1000);
	}
}

enum { ROLE_OUT0, ROLE_OUT1, ROLE_IN };

int main(int argc, char **argv)
{
	struct pollfd fds[2 + 3 * MAX_SESSIONS];
	struct { struct session *s; int role; } owner[2 + 3 * MAX_SESSIONS];
	const char *path = DEFAULT_PORT;
	sigset_t mask;
	int sigfd, null;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--fd") && i + 1 < argc) {
			port = atoi(argv[++i]);
			fd_mode = true;
		} else if (!strcmp(argv[i], "--port") && i + 1 < argc) {
			path = argv[++i];
		} else {
			fprintf(stderr, "usage: kdlab-agent [--port PATH | --fd N]\n");
			return 2;
		}
	}
	/* Children's stdio must not land on descriptors 0-2 of our own. */
	while ((null = open("/dev/null", O_RDWR)) >= 0 && null <= 2)
		;
	if (null > 2)
		close(null);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0) {
		note("signalfd: %s", strerror(errno));
		return 1;
	}
	out.cap = OUT_HARD + 4 * (HEADER + MAX_PAYLOAD);
	out.data = malloc(out.cap);
	if (!out.data)
		return 1;
	if (fd_mode) {
		if (fcntl(port, F_SETFD, FD_CLOEXEC) < 0) {
			note("--fd %d: %s", port, strerror(errno));
			return 2;
		}
	} else {
		setsid();	/* no console's Ctrl-C or hang-up reaches us */
		port = open_port(path);
	}
	set_nonblock(port);
	connected = true;

	for (;;) {
		int nfds = 0, timeout = -1;
		uint64_t now = now_ms();
		short port_events = 0;

		fds[nfds++] = (struct pollfd){ .fd = sigfd, .events = POLLIN };
		if (!connected && now >= retry_at)
			connected = true;
		if (connected) {
			short ev = (out.len < OUT_HARD && inlen < IN_CAP ? POLLIN : 0) |
				   (out.len ? POLLOUT : 0);

			owner[nfds].s = NULL;
			fds[nfds++] = (struct pollfd){ .fd = port, .events = ev };
		} else {
			timeout = (int)(retry_at - now);
		}
		/*
		 * Only descriptors we mean to use: a pipe whose other end closed
		 * reports POLLHUP even when no event was asked for.
		 */
		for (int i = 0; i < MAX_SESSIONS; i++) {
			struct session *s = &sessions[i];

			if (!s->id)
				continue;
			for (int k = 0; k < 2; k++)
				if (s->out[k] >= 0 && connected && out.len < OUT_SOFT &&
				    s->unacked[k] < WINDOW) {
					owner[nfds].s = s;
					owner[nfds].role = k;
					fds[nfds++] = (struct pollfd){ .fd = s->out[k], .events = POLLIN };
				}
			if (s->in >= 0 && s->inlen) {
				owner[nfds].s = s;
				owner[nfds].role = ROLE_IN;
				fds[nfds++] = (struct pollfd){ .fd = s->in, .events = POLLOUT };
			}
		}
		if (poll(fds, (nfds_t)nfds, timeout) < 0) {
			if (errno != EINTR)
				note("poll: %s", strerror(errno));
			continue;
		}
		if (fds[0].revents)
			reap(sigfd);
		/*
		 * Sessions first, the port last: a CLOSE and a SPAWN read from the
		 * port could put a new session on the descriptors polled here.
		 */
		for (int i = 1; i < nfds; i++) {
			struct session *s = owner[i].s;

			if (!s) {
				port_events = fds[i].revents;
				continue;
			}
			if (!fds[i].revents || !s->id)
				continue;
			if (owner[i].role == ROLE_IN) {
				if (s->in == fds[i].fd)
					write_stdin(s);
			} else if (s->out[owner[i].role] == fds[i].fd) {
				read_output(s, owner[i].role);
			}
		}
		if (port_events & (POLLIN | POLLHUP | POLLERR))
			read_port(port_events);
		if (connected && (port_events & POLLOUT))
			write_port();
		if (connected)
			finish();
	}
}
