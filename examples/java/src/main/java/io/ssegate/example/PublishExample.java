package io.ssegate.example;

import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.ssegate.v1.Event;
import io.ssegate.v1.PublishRequest;
import io.ssegate.v1.PublishResponse;
import io.ssegate.v1.PublishStreamRequest;
import io.ssegate.v1.PublishStreamResponse;
import io.ssegate.v1.PublisherGrpc;
import io.ssegate.v1.UserTarget;
import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.util.EnumSet;
import java.util.Iterator;
import java.util.List;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * Publishes events to ssegate over gRPC ({@code ssegate.v1.Publisher}), from plain Java.
 *
 * <p>Shows: a channel, a {@link ClientInterceptor} that adds {@code authorization: Bearer <key>}
 * to every call, deadlines, a retry that reuses one {@code idempotency_key}, and {@code
 * PublishStream} for bulk, with flow control.
 *
 * <p>Configuration (environment): {@code SSEGATE_API_KEY}, a publisher API key (without one, no
 * {@code authorization} header is sent: for a development server run with {@code
 * --insecure-open-publish}); {@code SSEGATE_GRPC_URL},
 * {@code http://host:port} (plaintext) or {@code https://host:port} (TLS), default {@code
 * http://127.0.0.1:50051}; {@code SSEGATE_TLS_CA_FILE}, with https, the CA that signed the
 * server's certificate (default: the JDK's roots); {@code SSEGATE_USER}, default {@code alice}.
 */
public final class PublishExample {
  /**
   * Retry only what the proto documents as transient: UNAVAILABLE (the server is draining, or the
   * NATS backplane could not store the event; another replica may take it) and DEADLINE_EXCEEDED
   * (the answer was lost, the publish may or may not have happened). Both are safe to retry only
   * because every attempt carries the same idempotency_key. Never retry INVALID_ARGUMENT,
   * RESOURCE_EXHAUSTED (a configured limit: the same request hits it again) or UNAUTHENTICATED.
   */
  private static final Set<Status.Code> RETRYABLE =
      EnumSet.of(Status.Code.UNAVAILABLE, Status.Code.DEADLINE_EXCEEDED);

  private static final int MAX_ATTEMPTS = 4;

  /**
   * Every call gets a deadline: without one, a call to an unreachable or stuck server waits
   * forever. A publish is answered in milliseconds; seconds leave room for a busy server.
   */
  private static final long CALL_TIMEOUT_MS = 5_000;

  private static final long BULK_TIMEOUT_MS = 30_000;

  private PublishExample() {}

  /**
   * Adds {@code authorization: Bearer <key>} to the headers of every call on the channel. Metadata
   * keys are lower case on the wire; {@code Metadata.Key.of} lower-cases them for you.
   */
  static final class BearerAuthInterceptor implements ClientInterceptor {
    private static final Metadata.Key<String> AUTHORIZATION =
        Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

    private final String headerValue;

    BearerAuthInterceptor(String apiKey) {
      this.headerValue = "Bearer " + apiKey;
    }

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
        @Override
        public void start(Listener<RespT> listener, Metadata headers) {
          headers.put(AUTHORIZATION, headerValue);
          super.start(listener, headers);
        }
      };
    }
  }

  /**
   * One channel per process, shared by every thread and call: it holds the HTTP/2 connection and
   * is expensive to create. {@code apiKey} null: calls carry no {@code authorization} header.
   */
  static ManagedChannel openChannel(URI url, String apiKey, String caFile) throws IOException {
    ChannelCredentials credentials;
    if ("http".equals(url.getScheme())) {
      credentials = InsecureChannelCredentials.create();
    } else if ("https".equals(url.getScheme())) {
      credentials =
          caFile == null
              ? TlsChannelCredentials.create()
              : TlsChannelCredentials.newBuilder().trustManager(new File(caFile)).build();
    } else {
      throw new IllegalArgumentException(
          "SSEGATE_GRPC_URL must be http://host:port or https://host:port, not " + url);
    }
    if (url.getHost() == null || url.getPort() < 0) {
      throw new IllegalArgumentException("SSEGATE_GRPC_URL needs a host and a port: " + url);
    }
    ManagedChannelBuilder<?> builder =
        Grpc.newChannelBuilder(url.getHost() + ":" + url.getPort(), credentials);
    if (apiKey != null) {
      builder.intercept(new BearerAuthInterceptor(apiKey));
    }
    return builder.build();
  }

  /**
   * Publishes, retrying transient failures with exponential backoff and jitter. The caller puts an
   * idempotency_key in {@code request} and every attempt sends that same request: if an attempt
   * did reach the server, the retry is answered with the first attempt's event id and the event is
   * delivered once.
   */
  static PublishResponse publishWithRetry(
      PublisherGrpc.PublisherBlockingStub stub, PublishRequest request)
      throws InterruptedException {
    long backoffMs = 200;
    for (int attempt = 1; ; attempt++) {
      try {
        // withDeadlineAfter fixes an instant, not a duration: take a fresh one per attempt.
        return stub.withDeadlineAfter(CALL_TIMEOUT_MS, TimeUnit.MILLISECONDS).publish(request);
      } catch (StatusRuntimeException e) {
        Status.Code code = e.getStatus().getCode();
        if (!RETRYABLE.contains(code) || attempt == MAX_ATTEMPTS) {
          throw e;
        }
        System.err.printf("attempt %d: %s, retrying%n", attempt, code);
        Thread.sleep((long) (backoffMs * (0.5 + ThreadLocalRandom.current().nextDouble())));
        backoffMs *= 2;
      }
    }
  }

  /**
   * Sends items on one PublishStream as fast as the stream accepts them, and prints each answer
   * (one per item, in order). Writing only while {@code isReady()} keeps a long list from piling
   * up in memory: gRPC calls the on-ready handler again when there is room.
   */
  static final class BulkPublisher
      implements ClientResponseObserver<PublishStreamRequest, PublishStreamResponse> {
    private final Iterator<PublishStreamRequest> items;
    private final CompletableFuture<Void> done = new CompletableFuture<>();
    private boolean requestsClosed;

    BulkPublisher(Iterator<PublishStreamRequest> items) {
      this.items = items;
    }

    @Override
    public void beforeStart(ClientCallStreamObserver<PublishStreamRequest> requests) {
      // gRPC runs this handler, onNext, onError and onCompleted one at a time for this call.
      requests.setOnReadyHandler(
          () -> {
            while (requests.isReady() && items.hasNext()) {
              requests.onNext(items.next());
            }
            if (!items.hasNext() && !requestsClosed) {
              requestsClosed = true;
              requests.onCompleted(); // the server ends the stream once every answer is sent
            }
          });
    }

    @Override
    public void onNext(PublishStreamResponse answer) {
      if (answer.getCode() == Status.Code.OK.value()) {
        System.out.printf(
            "bulk[%d]: event_id=%s recipients=%d%n",
            answer.getIndex(), answer.getEventId(), answer.getRecipients());
      } else {
        System.out.printf(
            "bulk[%d]: rejected %s: %s%n",
            answer.getIndex(),
            Status.fromCodeValue(answer.getCode()).getCode(),
            answer.getMessage());
      }
    }

    @Override
    public void onError(Throwable t) {
      done.completeExceptionally(t);
    }

    @Override
    public void onCompleted() {
      done.complete(null);
    }

    /** Waits for the end of the stream; the call's own deadline bounds the wait. */
    void await() throws InterruptedException, ExecutionException, TimeoutException {
      done.get(BULK_TIMEOUT_MS + 1_000, TimeUnit.MILLISECONDS);
    }
  }

  public static void main(String[] args) throws Exception {
    // Optional: a server run with --insecure-open-publish takes publishes without a key.
    String apiKey = envOr("SSEGATE_API_KEY", null);
    URI url = URI.create(envOr("SSEGATE_GRPC_URL", "http://127.0.0.1:50051"));
    String user = envOr("SSEGATE_USER", "alice");

    ManagedChannel channel = openChannel(url, apiKey, System.getenv("SSEGATE_TLS_CA_FILE"));
    try {
      run(channel, user);
    } catch (StatusRuntimeException e) {
      Status status = e.getStatus();
      boolean noKey = status.getCode() == Status.Code.UNAUTHENTICATED && apiKey == null;
      fail(
          status.getCode()
              + ": "
              + status.getDescription()
              + (noKey ? " (set SSEGATE_API_KEY to a publisher API key)" : ""));
    } catch (ExecutionException e) { // PublishStream failed as a whole
      Status status = Status.fromThrowable(e.getCause());
      fail(status.getCode() + ": " + status.getDescription());
    } finally {
      // Let in-flight calls finish, but do not hang the exit on them.
      channel.shutdown();
      if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
        channel.shutdownNow();
      }
    }
  }

  private static void run(ManagedChannel channel, String user) throws Exception {
    PublisherGrpc.PublisherBlockingStub stub = PublisherGrpc.newBlockingStub(channel);

    // One event to every connection of one user, made safe to retry by a key that is unique to
    // this logical publish (a UUID, or your own message id).
    PublishRequest request =
        PublishRequest.newBuilder()
            .addUserIds(user)
            .setEvent(Event.newBuilder().setName("greeting").setData("hello " + user))
            .setIdempotencyKey(UUID.randomUUID().toString())
            .build();
    PublishResponse first = publishWithRetry(stub, request);
    // `optional` in the proto: absent when the server cannot know (NATS backplane).
    String recipients = first.hasRecipients() ? Long.toString(first.getRecipients()) : "unknown";
    System.out.printf("greeting: event_id=%s recipients=%s%n", first.getEventId(), recipients);

    // What a retry after a lost answer looks like: the same request, the same key. The server
    // recognises the key and answers with the first event id; nothing is re-sent.
    PublishResponse again = publishWithRetry(stub, request);
    if (!again.getEventId().equals(first.getEventId())) {
      fail("a retry with the same key got a new id " + again.getEventId());
    }
    System.out.printf(
        "retried greeting with the same key: event_id=%s (delivered once)%n", again.getEventId());

    // Bulk: one stream, one answer per item, in order. Item 1 is invalid on purpose (`ssegate.`
    // names are reserved): it gets its own error code and the stream goes on.
    UserTarget toUser = UserTarget.newBuilder().addUserIds(user).build();
    List<PublishStreamRequest> items =
        List.of(
            toUser(toUser, "progress", "1 of 2"),
            toUser(toUser, "ssegate.bogus", "x"),
            toUser(toUser, "progress", "2 of 2"),
            // Empty name: the default `message` event. Newlines are fine in data.
            toUser(toUser, "", "bulk done\n2 items"));
    BulkPublisher bulk = new BulkPublisher(items.iterator());
    PublisherGrpc.newStub(channel)
        .withDeadlineAfter(BULK_TIMEOUT_MS, TimeUnit.MILLISECONDS)
        .publishStream(bulk);
    bulk.await();
  }

  private static PublishStreamRequest toUser(UserTarget target, String name, String data) {
    return PublishStreamRequest.newBuilder()
        .setUsers(target)
        .setEvent(Event.newBuilder().setName(name).setData(data))
        .build();
  }

  private static String envOr(String name, String fallback) {
    String value = System.getenv(name);
    return value == null || value.isEmpty() ? fallback : value;
  }

  private static void fail(String reason) {
    System.err.println("PublishExample: " + reason);
    System.exit(1);
  }
}
