package io.ssegate.example;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Executors;

/**
 * An authorizer for ssegate answering Connect/JSON, with the JDK only: what a Spring
 * {@code @PostMapping("/ssegate.v1.Authorizer/Authorize")} in your application does.
 *
 * <p>ssegate started with {@code --authorizer-addr http://127.0.0.1:8082 --authorizer-protocol
 * connect --authorizer-cookie SESSION} asks it, for every new event stream, whether it may open
 * and as whom: a POST of JSON with the browser's cookies, the user, groups and topics asked, and
 * its address (the proto3 JSON form of proto/ssegate/v1/authorizer.proto). It answers:
 *
 * <pre>
 *   {"allow": {"userId": "alice", "groups": ["staff"], "topics": [], "expiresAt": "1767225600"}}
 *   {"deny": {"status": 401, "reason": "not signed in"}}
 * </pre>
 *
 * <p>In Spring (Spring Security's session cookie, no JWT), the same is:
 *
 * <pre>
 * &#64;PostMapping("/ssegate.v1.Authorizer/Authorize")
 * Map&lt;String, Object&gt; authorize(&#64;RequestBody AuthorizeRequest req) {
 *   String id = req.cookies().stream().filter(c -&gt; c.name().equals("SESSION"))
 *       .map(Cookie::value).findFirst().orElse(null);
 *   Session s = id == null ? null : sessionRepository.findById(decode(id));  // Spring Session
 *   if (s == null || s.isExpired()) return Map.of("deny", Map.of("status", 401, "reason", "not signed in"));
 *   Authentication auth = ((SecurityContext) s.getAttribute("SPRING_SECURITY_CONTEXT")).getAuthentication();
 *   return Map.of("allow", Map.of("userId", auth.getName(), "groups", groupsOf(auth),
 *       "expiresAt", s.getLastAccessedTime().plus(s.getMaxInactiveInterval()).getEpochSecond()));
 * }
 * </pre>
 *
 * <p>Configuration (environment): {@code AUTHORIZER_ADDR}, host:port to listen on (default
 * 127.0.0.1:8082; port 0: any free port). The bound address is printed as {@code listening on
 * http://HOST:PORT}. Run it with {@code java
 * examples/java/src/main/java/io/ssegate/example/AuthorizerExample.java} (JDK 17, no build).
 */
public final class AuthorizerExample {
  static final String PATH = "/ssegate.v1.Authorizer/Authorize";

  /** session id -> user id and groups. Demo data: "s3cr3t-alice" is alice's session cookie. */
  static final Map<String, List<String>> SESSIONS =
      Map.of("s3cr3t-alice", List.of("alice", "staff"), "s3cr3t-bob", List.of("bob"));

  /** How long a granted stream may run before ssegate asks again (the session's remaining life). */
  static final long GRANT_SECONDS = 15 * 60;

  public static void main(String[] args) throws IOException {
    String addr = System.getenv().getOrDefault("AUTHORIZER_ADDR", "127.0.0.1:8082");
    int colon = addr.lastIndexOf(':');
    HttpServer server =
        HttpServer.create(
            new InetSocketAddress(addr.substring(0, colon), Integer.parseInt(addr.substring(colon + 1))), 0);
    server.createContext("/", AuthorizerExample::handle);
    server.setExecutor(Executors.newFixedThreadPool(8));
    server.start();
    InetSocketAddress bound = server.getAddress();
    System.out.println("listening on http://" + bound.getHostString() + ":" + bound.getPort());
    System.out.flush();
  }

  static void handle(HttpExchange ex) throws IOException {
    try {
      if (!ex.getRequestURI().getPath().equals(PATH)) {
        reply(ex, 404, "{\"code\":\"not_found\",\"message\":\"POST " + PATH + "\"}");
        return;
      }
      if (!ex.getRequestMethod().equals("POST")) {
        reply(ex, 405, "{\"code\":\"unimplemented\",\"message\":\"POST only\"}");
        return;
      }
      String body;
      try (InputStream in = ex.getRequestBody()) {
        body = new String(in.readAllBytes(), StandardCharsets.UTF_8);
      }
      Object request;
      try {
        request = new Json(body).value();
      } catch (RuntimeException e) { // IllegalArgument, and an index or number out of place
        reply(ex, 400, "{\"code\":\"invalid_argument\",\"message\":\"the body is not JSON\"}");
        return;
      }
      String answer = decide(request instanceof Map<?, ?> m ? m : Map.of());
      System.err.println("authorize from " + field(request, "peer") + ": " + answer);
      reply(ex, 200, answer);
    } finally {
      ex.close();
    }
  }

  /** The answer to one AuthorizeRequest, as JSON. */
  static String decide(Map<?, ?> request) {
    List<String> sessions = new ArrayList<>();
    if (request.get("cookies") instanceof List<?> cookies) {
      for (Object c : cookies) {
        if ("SESSION".equals(field(c, "name"))) {
          sessions.add(field(c, "value"));
        }
      }
    }
    // None, or two (set for two paths or domains): which one is meant is unclear.
    List<String> found = sessions.size() == 1 ? SESSIONS.get(sessions.get(0)) : null;
    if (found == null) {
      return "{\"deny\":{\"status\":401,\"reason\":\"not signed in\"}}";
    }
    String user = found.get(0);
    String asked = field(request, "user");
    if (!asked.isEmpty() && !asked.equals(user)) {
      return "{\"deny\":{\"status\":403,\"reason\":\"this session is not that user's\"}}";
    }
    StringBuilder groups = new StringBuilder();
    for (String g : found.subList(1, found.size())) {
      groups.append(groups.length() == 0 ? "" : ",").append(Json.quote(g));
    }
    long expiresAt = System.currentTimeMillis() / 1000 + GRANT_SECONDS;
    return "{\"allow\":{\"userId\":" + Json.quote(user) + ",\"groups\":[" + groups
        + "],\"topics\":[],\"expiresAt\":\"" + expiresAt + "\"}}";
  }

  static String field(Object object, String name) {
    return object instanceof Map<?, ?> m && m.get(name) instanceof String s ? s : "";
  }

  static void reply(HttpExchange ex, int status, String json) throws IOException {
    byte[] bytes = json.getBytes(StandardCharsets.UTF_8);
    ex.getResponseHeaders().set("Content-Type", "application/json");
    ex.sendResponseHeaders(status, bytes.length);
    try (OutputStream out = ex.getResponseBody()) {
      out.write(bytes);
    }
  }

  /** Just enough JSON for the example (Spring has Jackson): objects, arrays, strings, numbers, literals. */
  static final class Json {
    private final String s;
    private int i;

    Json(String s) {
      this.s = s;
    }

    Object value() {
      Object v = any();
      space();
      if (i != s.length()) {
        throw new IllegalArgumentException("trailing data");
      }
      return v;
    }

    private Object any() {
      space();
      if (i >= s.length()) {
        throw new IllegalArgumentException("unexpected end");
      }
      char c = s.charAt(i);
      if (c == '{') {
        Map<String, Object> m = new LinkedHashMap<>();
        i++;
        space();
        if (peek('}')) {
          return m;
        }
        do {
          space();
          String key = string();
          space();
          expect(':');
          m.put(key, any());
          space();
        } while (peek(','));
        expect('}');
        return m;
      }
      if (c == '[') {
        List<Object> l = new ArrayList<>();
        i++;
        space();
        if (peek(']')) {
          return l;
        }
        do {
          l.add(any());
          space();
        } while (peek(','));
        expect(']');
        return l;
      }
      if (c == '"') {
        return string();
      }
      int start = i;
      while (i < s.length() && "+-0123456789.eEtruefalsn".indexOf(s.charAt(i)) >= 0) {
        i++;
      }
      if (start == i) {
        throw new IllegalArgumentException("unexpected " + c);
      }
      return s.substring(start, i);
    }

    private String string() {
      expect('"');
      StringBuilder b = new StringBuilder();
      while (i < s.length() && s.charAt(i) != '"') {
        char c = s.charAt(i++);
        if (c == '\\') {
          char e = s.charAt(i++);
          switch (e) {
            case 'n' -> b.append('\n');
            case 't' -> b.append('\t');
            case 'r' -> b.append('\r');
            case 'b' -> b.append('\b');
            case 'f' -> b.append('\f');
            case 'u' -> {
              b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
              i += 4;
            }
            default -> b.append(e);
          }
        } else {
          b.append(c);
        }
      }
      expect('"');
      return b.toString();
    }

    private void space() {
      while (i < s.length() && Character.isWhitespace(s.charAt(i))) {
        i++;
      }
    }

    private boolean peek(char c) {
      if (i < s.length() && s.charAt(i) == c) {
        i++;
        return true;
      }
      return false;
    }

    private void expect(char c) {
      if (!peek(c)) {
        throw new IllegalArgumentException("expected " + c + " at " + i);
      }
    }

    static String quote(String v) {
      StringBuilder b = new StringBuilder("\"");
      for (char c : v.toCharArray()) {
        if (c == '"' || c == '\\') {
          b.append('\\').append(c);
        } else if (c < 0x20) {
          b.append(String.format("\\u%04x", (int) c));
        } else {
          b.append(c);
        }
      }
      return b.append('"').toString();
    }
  }
}
